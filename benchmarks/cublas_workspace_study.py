"""cuBLAS's 4-byte memsets inside a CUDA graph: SD3's compiled step runs 120 of them (one before each
large "coop" matmul kernel), and the graph waits about 3 us after each. This times one SD3-medium
block's large matmuls (CFG batch, 1024x1024), 24 blocks in one CUDA graph, under cuBLAS's workspace
settings, each in its own process (cuBLAS reads them when torch creates its handles), and counts the
memsets and the kernels cuBLAS chose.

  python benchmarks/cublas_workspace_study.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# name -> environment: torch's own workspace variables (torch reads both when it first calls cuBLAS)
SETTINGS = {
    "default": {},
    "no cuBLASLt workspace": {"CUBLASLT_WORKSPACE_SIZE": "0"},
    "no workspace at all": {"CUBLASLT_WORKSPACE_SIZE": "0", "CUBLAS_WORKSPACE_CONFIG": ":0:0"},
}
TOKENS, WIDTH, HIDDEN, BLOCKS = 8192, 1536, 6144, 24


def child() -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02

    x = rnd(TOKENS, WIDTH)
    w_qkv, b_qkv, w_o = rnd(3 * WIDTH, WIDTH), rnd(3 * WIDTH), rnd(WIDTH, WIDTH)
    w1, b1, w2, b2 = rnd(HIDDEN, WIDTH), rnd(HIDDEN), rnd(WIDTH, HIDDEN), rnd(WIDTH)

    def step():
        h = x
        for _ in range(BLOCKS):
            qkv = F.linear(h, w_qkv, b_qkv)
            a = F.linear(qkv[:, :WIDTH], w_o)
            m = torch._addmm_activation(b1, a, w1.t(), use_gelu=True)
            h = F.linear(m, w2, b2)
        return h

    for _ in range(3):
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted({n for n in names if "Memset" not in n})
    reference = step()
    return {"ms_per_24_blocks": sorted(times)[len(times) // 2], "memsets": sum("Memset" in n for n in names),
            "kernels": kernels, "finite": bool(torch.isfinite(out).all()),
            "graph_equals_eager": bool(torch.equal(out, reference))}


def main() -> None:
    if os.environ.get("_WORKSPACE_CHILD"):
        print(json.dumps(child()))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    for name, env in SETTINGS.items():
        done = subprocess.run([sys.executable, __file__], env={**os.environ, **env, "_WORKSPACE_CHILD": "1"},
                              capture_output=True, text=True)
        if done.returncode:
            results[name] = {"error": done.stderr[-2000:]}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:24s} " + (f"{r['ms_per_24_blocks']:.3f} ms  memsets {r['memsets']}  "
                                f"kernels {r['kernels']}" if "error" not in r else r["error"][-400:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
