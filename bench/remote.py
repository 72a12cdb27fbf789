"""diffboost-bench --server URL: the same comparison against a running ComfyUI, through its HTTP
API. Each variant is one API-format prompt: the server's checkpoint, text encoding, the variant's
nodes, the Benchmark Sampler (whose stats come back in /history) and SaveLatent (whose file gives
the final latent for the comparison with eager)."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

PROMPT_TEXT = "a photograph of a lighthouse on a cliff at sunset, detailed"


class PromptBuilder:
    """Builds an API-format prompt: {id: {"class_type", "inputs"}}; `add` returns the output link.
    Widget inputs not given take the default the server's /object_info lists (schemas grow)."""

    def __init__(self, url: str | None = None):
        self.url = url
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> list:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": {**self._defaults(class_type), **inputs}}
        return [node_id, 0]

    def _defaults(self, class_type: str) -> dict:
        if not self.url:
            return {}
        info = _request(f"{self.url}/object_info/{urllib.parse.quote(class_type)}").get(class_type, {})
        required = info.get("input", {}).get("required", {})
        return {name: spec[1]["default"] for name, spec in required.items()
                if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


class ServerError(RuntimeError):
    pass


def benchmark_prompt(variant, args, ckpt: str, res: int, cfg: float, url: str | None = None) -> tuple[dict, str, str]:
    """(prompt, Benchmark Sampler node id, SaveLatent node id) for one variant."""
    pb = PromptBuilder(url)
    loader = pb.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    clip = [loader[0], 1]
    positive = pb.add("CLIPTextEncode", text=PROMPT_TEXT, clip=clip)
    negative = pb.add("CLIPTextEncode", text="", clip=clip)
    latent = pb.add("EmptyLatentImage", width=res, height=res, batch_size=args.batch)
    model = variant.graph(pb, [loader[0], 0])
    bench = pb.add("DiffBoostBenchmarkSampler", model=model, seed=args.seed, steps=args.steps, cfg=cfg,
                   sampler_name=args.sampler, scheduler=args.scheduler, positive=positive, negative=negative,
                   latent_image=latent, denoise=1.0, warmup_runs=args.warmup, timed_runs=args.runs)
    save = pb.add("SaveLatent", samples=bench, filename_prefix=f"diffboost-bench/{variant.name}")
    return pb.nodes, bench[0], save[0]


def run_remote(args, chosen) -> tuple[list[dict], str]:
    if not args.ckpt:
        raise SystemExit("diffboost-bench --server needs --ckpt NAME: a checkpoint the server lists in "
                         "models/checkpoints (random-weight models exist only in process)")
    from tqdm import tqdm

    from .cli import _row_from_stats

    url = args.server.rstrip("/")
    res = args.res or 1024
    cfg = args.cfg if args.cfg is not None else 7.0
    header = f"{args.ckpt} on {url}, {res}x{res}, batch {args.batch}, {args.steps} steps {args.sampler}/" \
             f"{args.scheduler}, cfg {cfg}, {args.warmup} warm-up + {args.runs} timed runs"
    print(header)
    client_id = uuid.uuid4().hex
    rows = []
    for variant in tqdm(chosen, desc="variants", unit="variant"):
        row = {"variant": variant.name, "ok": False, "error": None}
        rows.append(row)
        if variant.graph is None:
            row["error"] = "skipped: not available through --server (needs in-process model building)"
            continue
        try:
            prompt, bench_id, save_id = benchmark_prompt(variant, args, args.ckpt, res, cfg, url)
            outputs = run_prompt(url, prompt, client_id, args.timeout)
            stats = outputs[bench_id]["diffboost_stats"][0]
            row.update(_row_from_stats(stats))
            row["latent"] = fetch_latent(url, outputs[save_id]["latents"][0])
            row["ok"] = True
        except Exception as e:  # a failing variant is its row
            row["error"] = f"{type(e).__name__}: {e}"[:500]
    return rows, header


def run_prompt(url: str, prompt: dict, client_id: str, timeout: float) -> dict:
    """POST the prompt, wait for it in /history, return its outputs ({node id: ui dict}).
    Raises ServerError with the server's own message when it rejects or fails the prompt."""
    try:
        answer = _request(f"{url}/prompt", {"prompt": prompt, "client_id": client_id})
    except urllib.error.HTTPError as e:
        raise ServerError(f"server rejected the prompt: {e.read().decode(errors='replace')[:400]}") from None
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = _request(f"{url}/history/{prompt_id}")
        if prompt_id in history:
            entry = history[prompt_id]
            status = entry.get("status", {})
            if status.get("status_str") == "error":
                messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                detail = messages[0][1].get("exception_message", "") if messages else status
                raise ServerError(f"prompt failed on the server: {detail}")
            return entry.get("outputs", {})
        time.sleep(0.5)
    raise ServerError(f"no result after {timeout:.0f} s (prompt {prompt_id} still queued or running)")


def fetch_latent(url: str, saved: dict):
    from safetensors.torch import load

    query = urllib.parse.urlencode({"filename": saved["filename"], "subfolder": saved.get("subfolder", ""),
                                    "type": saved.get("type", "output")})
    with urllib.request.urlopen(f"{url}/view?{query}", timeout=60) as r:
        return load(io.BytesIO(r.read()).getvalue())["latent_tensor"].float()


def _request(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())
