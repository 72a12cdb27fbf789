"""What dynamo guards when it traces a denoiser through ComfyUI's real sampling path: the guards a
warm start must build again even when every kernel comes from the compile cache.

  python benchmarks/guard_study.py [--model sdxl] [--res 64]

Runs `diffboost-bench` in this process on the CPU (random weights of the real architecture, one
1-step sampling run, ComfyUI's SDPA attention path as on a GPU, so the UNet is one graph) with
diffboost's inductor backend generating no code: the first call is dynamo's tracing and guard
building alone. Prints torch's timers for both, and the guards by kind and by the attribute they
check (the last part of each guard's name)."""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--res", default="64")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    import diffboost.backends.inductor as inductor
    from diffboost.bench import cli
    from diffboost.bench.host import comfy_path

    sys.path.insert(0, str(comfy_path()))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True  # a GPU's attention path: no graph breaks

    def no_code(self, model_, inputs_, **kwargs):  # count the graph, run it as traced
        self._on_graph()
        return model_.forward

    seen: list[tuple[str, str]] = []
    keep = inductor.keep_transformer_options_unguarded

    def recording(entries):  # every guard dynamo built passes through the filter diffboost installs
        seen.extend((e.name, e.guard_type) for e in entries)
        return keep(entries)

    inductor._CountingInductor.__call__ = no_code
    inductor.keep_transformer_options_unguarded = recording
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        cli.main(["--model", args.model, "--dtype", "bf16", "--res", args.res, "--steps", "1", "--runs", "1",
                  "--variants", "eager,diffboost=default", "--json", str(out)])
        row = json.loads(out.read_text())["variants"][-1]
    timers = row["stats"]["first_call_compile"]["timers_s"]
    print(f"\nfirst call {row['first_call_s']:.1f} s: bytecode tracing {timers.get('bytecode_tracing', 0):.1f} s, "
          f"building guards {timers.get('build_guards', 0):.1f} s; {len(seen)} guards")
    print("\n| guards | kind |\n|---|---|")
    for kind, n in collections.Counter(t for _, t in seen).most_common(args.top):
        print(f"| {n} | {kind} |")
    print("\n| guards | kind | attribute checked |\n|---|---|---|")
    attribute = collections.Counter((t, re.split(r"[.\[]", name)[-1].strip("']")) for name, t in seen)
    for (kind, attr), n in attribute.most_common(args.top):
        print(f"| {n} | {kind} | {attr or '(the object)'} |")


if __name__ == "__main__":
    main()
