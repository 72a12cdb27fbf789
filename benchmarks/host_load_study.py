"""How a busy or slow host CPU moves each variant's speed: `diffboost-bench` with the process and its
threads held to a few CPU cores that busy-looping processes share with it.

  python benchmarks/host_load_study.py --cores 1 --hogs 1 -- --model flux --steps 20 --runs 2 \\
      --variants 'eager,diffboost-O3,diffboost=O3:regional,regional-uncopied' --json F

`--cores N` holds the bench (and the compile workers it starts) to the first N cores; `--hogs H` starts
H processes spinning on those same cores, so the bench's Python gets about N/(N+H) of them: a host
that launches kernels more slowly, as the slow hosts of RESULTS.md did. `--hogs 0` is the unloaded
control. First calls compile on the shared cores too: they are longer than on a free host.

`regional-uncopied` is `O3:regional` as it was before its blocks were compiled behind copies of their
arguments (backends/regional.py): the blocks' in-place adds make inductor's CUDA graph trees leave
them out, and every block is launched kernel by kernel. It swaps the copying module for the bare block
in this process, so it runs last, after the variants that need the copies.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

UNCOPIED = "regional-uncopied"


def spin(cores: set[int]) -> None:
    os.sched_setaffinity(0, cores)
    while True:
        pass


def start_hogs(count: int, cores: set[int]) -> list[multiprocessing.Process]:
    # Forked before torch is imported: nothing of its state is shared with the spinning processes.
    context = multiprocessing.get_context("fork")
    hogs = [context.Process(target=spin, args=(cores,), daemon=True) for _ in range(count)]
    for hog in hogs:
        hog.start()
    return hogs


def register_uncopied() -> None:
    """The variant `regional-uncopied`: `O3:regional` compiled on the bare blocks."""
    from diffboost.backends import inductor, regional
    from diffboost.bench import variants

    copied_apply, _ = variants._diffboost_compile("inductor", "O3:regional")

    def apply(base, bm):
        regional.ArgumentsCopied = lambda block: block  # the blocks themselves are compiled
        inductor._EARLIER_COMPILES.clear()  # the copied regions' compiles must not serve the bare blocks
        return copied_apply(base, bm)

    variants.register(variants.Variant(UNCOPIED, "O3:regional on the bare blocks (before the copies)",
                                       apply=apply, default=False, cached=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cores", type=int, default=1, help="cores the bench may use (the first N)")
    p.add_argument("--hogs", type=int, default=1, help="busy-looping processes on those cores (0: unloaded)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then diffboost-bench's arguments")
    args = p.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    variants = bench_args[bench_args.index("--variants") + 1].split(",") if "--variants" in bench_args else []
    if UNCOPIED in variants and variants[-1] != UNCOPIED:
        p.error(f"{UNCOPIED} changes the regional compile for the rest of the process: name it last")
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= args.cores <= len(available):
        p.error(f"--cores must be 1 to {len(available)} on this machine")
    cores = set(available[:args.cores])
    os.sched_setaffinity(0, cores)  # before any thread starts: every thread and child inherits it
    hogs = start_hogs(args.hogs, cores)
    print(f"host load: bench held to cores {sorted(cores)}, {args.hogs} spinning process(es) on them", flush=True)
    try:
        register_uncopied()
        from diffboost.bench.cli import main as bench

        return bench(bench_args)
    finally:
        for hog in hogs:
            hog.terminate()


if __name__ == "__main__":
    sys.exit(main())
