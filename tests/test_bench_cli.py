"""diffboost-bench on a CPU: the default variants on tiny SD1.5, a JSON record per variant, a PNG."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from diffboost.bench import variants

REQUIRED = ("variant", "it_per_s", "first_call_s", "peak_mem_bytes", "recompiles", "tflops", "rel_err_vs_eager",
            "cosine_vs_eager", "one_call_rel_err_vs_eager", "one_call_cosine_vs_eager")


def _kitchen_as_installed() -> str:
    try:
        return f"comfy_kitchen {importlib.metadata.version('comfy-kitchen')}"
    except importlib.metadata.PackageNotFoundError:
        return "without comfy_kitchen"


def test_cli_compares_the_default_variants_on_cpu(tmp_path, comfy_path):
    out_json, out_png, profiles = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "profiles"
    cmd = [sys.executable, "-m", "diffboost.bench", "--model", "tiny-sd15", "--steps", "2", "--runs", "2",
           "--res", "64", "--json", str(out_json), "--plot", str(out_png), "--profile", str(profiles)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path, also on a machine with a GPU
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "it/s" in proc.stdout and "eager" in proc.stdout
    written = json.loads(out_json.read_text())
    records = written["variants"]
    assert [r["variant"] for r in records] == variants.names(default_only=True)
    # The setup line says whether ComfyUI's eager ran with comfy_kitchen (Flux's eager RoPE depends on it).
    assert written["setup"].endswith(_kitchen_as_installed()), written["setup"]
    for r in records:
        for key in REQUIRED:
            assert key in r, (r["variant"], key)
        if r["ok"]:
            assert r["it_per_s"] > 0 and r["first_call_s"] > 0 and r["tflops"] > 0
            assert r["rel_err_vs_eager"] is not None and r["rel_err_vs_eager"] < 0.05, r
            assert r["cosine_vs_eager"] > 0.99
            assert r["one_call_rel_err_vs_eager"] is not None and r["one_call_rel_err_vs_eager"] < 0.05, r
            assert r["one_call_cosine_vs_eager"] > 0.99
            # The profiled run: 2 steps, the UNet's convolutions and matmuls in it, a summary file.
            p = r["profile"]
            assert p["steps"] == 2 and p["kernels_per_step"]["convolution"] > 0 and p["kernels_per_step"]["matmul"] > 0
            assert 0 < p["busy_ms_per_step"] <= p["wall_ms_per_step"]
            assert "| convolution |" in (profiles / f"{r['variant']}.md").read_text()
            with gzip.open(profiles / f"{r['variant']}.trace.json.gz") as trace:  # the timeline, for Perfetto
                assert any(e.get("name") == "aten::mm" for e in json.load(trace)["traceEvents"])
        else:  # only variants that cannot run here (FP8 without an FP8 GPU) may be missing, and say why
            assert r["error"].startswith("skipped: "), r
    eager = records[0]
    assert eager["ok"] and eager["rel_err_vs_eager"] == 0.0 and eager["speedup_vs_eager"] == 1.0
    # Where each first call's time went: eager compiles nothing, a compiled variant traces and compiles.
    assert eager["stats"]["first_call_compile"] is None and "eager: " in proc.stdout
    compiled = next(r for r in records if r["ok"] and r["variant"].startswith("diffboost-"))
    assert compiled["stats"]["first_call_compile"]["compile_s"] > 0
    assert f"{compiled['variant']}: " in proc.stdout.split("first call:")[-1]
    assert eager["one_call_rel_err_vs_eager"] == 0.0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variant_registry_selects_eager_first_and_rejects_unknown_names():
    chosen = variants.select("diffboost-O2,eager")
    assert [v.name for v in chosen] == ["eager", "diffboost-O2"]
    with pytest.raises(ValueError, match="unknown variant"):
        variants.select("eager,turbo")
    assert {"eager", "comfy-compile", "diffboost-O2", "diffboost-O3", "comfy-fp8", "diffboost-fp8"} <= set(
        variants.VARIANTS)


def test_bad_counts_are_refused_before_anything_runs():
    proc = subprocess.run([sys.executable, "-m", "diffboost.bench", "--runs", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--runs" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "diffboost.bench", "--server", "http://127.0.0.1:1", "--profile", "p"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "run the model in this process" in proc.stderr


def test_server_prompts_put_the_variant_between_checkpoint_and_benchmark_sampler():
    from argparse import Namespace

    from diffboost.bench.remote import benchmark_prompt

    args = Namespace(batch=1, seed=3, steps=4, sampler="euler", scheduler="simple", warmup=1, runs=2)
    for name, expected in (("eager", "CheckpointLoaderSimple"), ("diffboost-O2", "DiffBoostCompileModel"),
                           ("comfy-compile", "TorchCompileModel")):
        prompt, bench_id, save_id = benchmark_prompt(variants.VARIANTS[name], args, "model.safetensors", 512, 7.0)
        bench = prompt[bench_id]
        assert bench["class_type"] == "DiffBoostBenchmarkSampler" and bench["inputs"]["timed_runs"] == 2
        assert prompt[bench["inputs"]["model"][0]]["class_type"] == expected
        assert prompt[save_id]["inputs"]["samples"] == [bench_id, 0]


def test_custom_variants_take_a_mode_and_fp8_layer_settings():
    chosen = variants.select("diffboost=O2:benchmark,diffboost-fp8=O3;min=2;skip=*.txt_*;skip=txt_in")
    assert [v.name for v in chosen] == ["diffboost=O2:benchmark", "diffboost-fp8=O3;min=2;skip=*.txt_*;skip=txt_in"]
    assert variants._fp8_settings("v", ["min=2.5", "skip=*.ff.*", "unskip=*.txt_*", "unskip=txt_in"]) == (
        variants.Fp8Settings(2.5, ("*.ff.*",), ("*.txt_*", "txt_in"), fuse_gelu=True))
    assert not variants._fp8_settings("v", ["fuse_gelu=0"]).fuse_gelu
    ignore = variants.ignore_list(("*.ff.*",), ("*.txt_*", "*_mod.lin"))
    assert "*.ff.*" in ignore and "txt_in" in ignore and "*.txt_*" not in ignore and "*_mod.lin" not in ignore
    for bad, message in (("diffboost-fp8=O3;min=lots", "min=lots is not a number"),
                         ("diffboost-fp8=O3;fast", "'fast' is none of min=MILLIONS, skip=PATTERN, unskip=PATTERN, "
                                                   r"fuse_gelu=0\|1"),
                         ("diffboost-fp8=O3;unskip=*.ff.*", r"unskip=\*.ff.\* is not one of Quantize FP8's default"),
                         ("diffboost=O2;min=2", r"only diffboost=MODE\[;dynamic"),
                         ("diffboost=O2;dynamic=sometimes", "dynamic 'sometimes' is not one of auto, on, off"),
                         ("diffboost=warp-speed", "variant 'diffboost=warp-speed'")):
        with pytest.raises(ValueError, match=message):
            variants.select(bad)


def test_variants_compiled_by_diffboost_are_the_ones_the_restart_measures_again():
    """`--restart` reruns the `cached` variants: their artifacts are in the compile cache."""
    chosen = variants.select("eager,comfy-compile,diffboost-O3,diffboost-fp8,diffboost-fp8-O3,diffboost=O3:regional,"
                             "diffboost-fp8=O3;min=2,diffboost=O3;conds=per-step")
    assert {v.name: v.cached for v in chosen} == {
        "eager": False, "comfy-compile": False, "diffboost-O3": True, "diffboost-fp8": False,
        "diffboost-fp8-O3": True, "diffboost=O3:regional": True, "diffboost-fp8=O3;min=2": True,
        "diffboost=O3;conds=per-step": True}


def test_custom_variants_take_compile_model_inputs():
    """`diffboost=O3;dynamic=on` against `diffboost=O3` in one run is how dynamic and static compare."""
    from argparse import Namespace

    from diffboost.bench.remote import benchmark_prompt

    name = "diffboost=O3;dynamic=on;memory_format=channels_last;fuse_qkv=1"
    (variant,) = variants.select(name)
    assert "dynamic on" in variant.summary and "memory_format channels_last" in variant.summary
    args = Namespace(batch=1, seed=3, steps=4, sampler="euler", scheduler="simple", warmup=1, runs=2)
    prompt, bench_id, _ = benchmark_prompt(variant, args, "model.safetensors", 512, 7.0)
    node = prompt[prompt[bench_id]["inputs"]["model"][0]]
    assert node["class_type"] == "DiffBoostCompileModel"
    assert (node["inputs"]["mode"], node["inputs"]["dynamic"], node["inputs"]["memory_format"],
            node["inputs"]["fuse_qkv"]) == ("O3", "on", "channels_last", True)
    assert variants._compile_settings("v", ["dynamic=off", "min=2"]) == ({"dynamic": "off"}, ["min=2"])
    # The A/B of moving the conditioning once: in process only, since a server graph has no such input.
    (per_step,) = variants.select("diffboost=O3;conds=per-step")
    assert "conditioning copied at every step" in per_step.summary and per_step.graph is None
    (fp8_per_step,) = variants.select("diffboost-fp8=O3;min=2;conds=per-step")
    assert fp8_per_step.summary.startswith("diffboost Quantize FP8") and "at every step" in fp8_per_step.summary


def test_restart_measures_the_warm_start_beside_the_cold_one(tmp_path, comfy_path):
    """`--restart`: the variants again in a new process with an empty inductor cache, where only the
    compile cache the first process filled can help; both first calls in one table. Variants that
    diffboost does not compile (here the uncompiled FP8, unavailable on the CPU) are not run again."""
    out_json, cache = tmp_path / "bench.json", tmp_path / "cache"
    cmd = [sys.executable, "-m", "diffboost.bench", "--model", "tiny-sd15", "--steps", "2", "--runs", "1",
           "--res", "64", "--variants", "eager,diffboost-fp8,diffboost=default", "--compile-cache", str(cache),
           "--restart", "--json", str(out_json)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["variant"]: r for r in json.loads(out_json.read_text())["variants"]}
    assert list(records) == ["eager", "diffboost-fp8", "diffboost=default", "diffboost=default (restart)"]
    cold, warm = records["diffboost=default"], records["diffboost=default (restart)"]
    assert cold["model_state"].endswith("cache miss") and warm["model_state"].endswith("cache hit")
    assert len(list(cache.glob("*.torchcache"))) == 1
    # The warm process generated no kernel code: every graph came from the compile cache.
    counts = warm["stats"]["first_call_compile"]["cache_counts"]
    assert counts.get("inductor.fxgraph_cache_hit", 0) >= 1 and "inductor.fxgraph_cache_miss" not in counts
    assert cold["stats"]["first_call_compile"]["cache_counts"].get("inductor.fxgraph_cache_miss", 0) >= 1
    assert warm["rel_err_vs_eager"] < 0.05 and warm["speedup_vs_eager"] is not None
    assert "diffboost=default (restart): " in proc.stdout.split("first call:")[-1]


def test_restart_and_compile_cache_are_refused_with_server():
    proc = subprocess.run([sys.executable, "-m", "diffboost.bench", "--server", "http://127.0.0.1:1", "--restart"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "do not work with --server" in proc.stderr
