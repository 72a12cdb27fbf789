"""The persistent compile cache, engine level: a second process reuses what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffboost.backends import CompileCache, CompileOptions
from diffboost.backends.cache import cache_key

# Runs in a fresh process with its own empty inductor cache, so only diffboost's cache can help.
CHILD = textwrap.dedent("""
    import json, sys, torch
    from diffboost.backends import CompileCache, CompileOptions, compile_module
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(6)])
    compiled = compile_module(model, CompileOptions.from_user("inductor", "default"), cache=CompileCache(sys.argv[1]))
    x = torch.randn(8, 64)
    out = compiled(x)
    err = float((out - model(x)).abs().max())
    inductor = torch._dynamo.utils.counters["inductor"]
    print(json.dumps({**compiled.stats.as_dict(), "err": err, "fxgraph_cache_hit": inductor["fxgraph_cache_hit"],
                      "fxgraph_cache_miss": inductor["fxgraph_cache_miss"]}))
""")


# Compiles twice in one process: a second input size, after the first compile was already saved.
TWO_SIZES = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import counters
    from diffboost.backends import CompileCache, CompileOptions, compile_module
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    options = CompileOptions.from_user("inductor", "default", dynamic="off")
    compiled = compile_module(model, options, cache=CompileCache(sys.argv[1]))
    with torch.no_grad():
        for rows in (8, 16):
            compiled(torch.randn(rows, 64))
    print(json.dumps({**compiled.stats.as_dict(), **counters["aot_autograd"], **counters["inductor"]}))
""")


# An FP8 stand-in whose layers took over the GELU in front of them: the compiled graph calls
# diffboost's own op (diffboost::gelu_quantize_rows), which the cached artifacts must carry too.
FP8_CHILD = textwrap.dedent("""
    import json, sys, torch
    from diffboost.backends import CompileCache, CompileOptions, compile_module
    from diffboost.quant import Fp8Linear, QuantConfig, quantized_standin
    torch.manual_seed(0)
    block = lambda: torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(approximate="tanh"),
                                        torch.nn.Linear(256, 64))
    model = torch.nn.Sequential(*[block() for _ in range(3)]).eval()
    config = QuantConfig.from_user("rowwise", min_features=16, min_weights_millions=0, allow_reference_path=True)
    standin = quantized_standin(model, config)
    fused = sum(isinstance(m, Fp8Linear) and m.gelu_from == 0 for m in standin.modules())
    compiled = compile_module(standin, CompileOptions.from_user("inductor", "default", dynamic="off"),
                              cache=CompileCache(sys.argv[1]))
    x = torch.randn(8, 64)
    with torch.no_grad():
        err = float((compiled(x) - standin(x)).abs().max())
    inductor = torch._dynamo.utils.counters["inductor"]
    print(json.dumps({**compiled.stats.as_dict(), "err": err, "fused": fused,
                      "fxgraph_cache_hit": inductor["fxgraph_cache_hit"],
                      "fxgraph_cache_miss": inductor["fxgraph_cache_miss"]}))
""")


def run_child(cache_dir, inductor_dir, code=CHILD):
    # Saved graphs off: these tests are about torch's artifacts, which serve whatever no saved graph
    # runs (graph breaks, block-by-block compiles, other inputs); tests/test_saved_graph.py has those.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "0",
           "DIFFBOOST_SAVED_GRAPHS": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(cache_dir)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_cache_and_skips_most_of_the_compile(tmp_path):
    cache_dir = tmp_path / "cache"
    cold = run_child(cache_dir, tmp_path / "inductor-a")
    assert cold["cache"] == "miss" and cold["graphs_compiled"] == 1 and cold["err"] < 1e-5
    entries = CompileCache(cache_dir).entries()
    assert len(entries) == 1 and entries[0].stat().st_size > 0

    warm = run_child(cache_dir, tmp_path / "inductor-b")  # a new, empty inductor cache
    assert warm["cache"] == "hit" and warm["err"] < 1e-5
    # What the cache skips is inductor's code generation: the cold process generated the graph's code,
    # the warm one, with an empty inductor cache of its own, found it in diffboost's cache. (Timing is
    # not asserted: on this tiny model both first calls are mostly fixed start-up cost.)
    assert cold["fxgraph_cache_miss"] >= 1 and cold["fxgraph_cache_hit"] == 0, cold
    assert warm["fxgraph_cache_hit"] >= 1 and warm["fxgraph_cache_miss"] == 0, warm
    print(f"first call: cold {cold['first_call_seconds']:.2f} s, warm {warm['first_call_seconds']:.2f} s")


def test_what_was_compiled_after_the_first_save_is_kept_too(tmp_path):
    """torch's artifacts, saved after each compile, hold one group per compile; loaded as they are,
    only the last group of each kind survives. The cache keeps them all: the second process traces
    no graph through AOTAutograd again and generates no kernel code."""
    cache_dir = tmp_path / "cache"
    cold = run_child(cache_dir, tmp_path / "inductor-a", TWO_SIZES)
    assert cold["graphs_compiled"] == 2 and cold["autograd_cache_miss"] == 2 and cold["fxgraph_cache_miss"] == 2
    warm = run_child(cache_dir, tmp_path / "inductor-b", TWO_SIZES)  # a new, empty inductor cache
    assert warm["cache"] == "hit"
    assert warm.get("autograd_cache_hit") == 2 and warm.get("autograd_cache_miss", 0) == 0, warm
    assert warm.get("fxgraph_cache_miss", 0) == 0, warm


def test_corrupt_entry_is_set_aside_and_rebuilt(tmp_path, caplog):
    cache = CompileCache(tmp_path)
    cache.root.mkdir(parents=True, exist_ok=True)
    cache.path("broken").write_bytes(b"not torch artifacts")
    with caplog.at_level("WARNING", logger="diffboost"):
        assert cache.load("broken") is False
    assert "could not be loaded" in caplog.text
    assert not cache.path("broken").exists() and (tmp_path / "broken.broken").exists()
    assert cache.clear() == 1 and not list(tmp_path.iterdir())


def test_size_cap_drops_least_recently_used_first(tmp_path):
    cache = CompileCache(tmp_path, max_bytes=250)
    for i, name in enumerate(["old", "mid", "new"]):
        p = cache.path(name)
        p.write_bytes(b"x" * 100)
        os.utime(p, (1000 + i, 1000 + i))
    cache.prune()
    assert [p.name for p in cache.entries()] == [cache.path("mid").name, cache.path("new").name]


def test_key_changes_with_what_changes_the_result():
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 16)
    o2, o3 = CompileOptions.from_user("inductor", "O2"), CompileOptions.from_user("inductor", "O3")
    assert cache_key(a, o2, "cpu") == cache_key(torch.nn.Linear(8, 8), o2, "cpu")  # weights' values don't matter
    assert len({cache_key(a, o2, "cpu"), cache_key(b, o2, "cpu"), cache_key(a, o3, "cpu"),
                cache_key(a, o2, "H100"), cache_key(a.to(torch.float16), o2, "cpu")}) == 5


def test_key_changes_with_the_pack_s_code(tmp_path, monkeypatch):
    import shutil

    from diffboost.backends import cache

    for folder in cache.CODE_FOLDERS:
        shutil.copytree(cache.PACK_ROOT / folder, tmp_path / folder)
    assert cache.code_digest(tmp_path) == cache.code_digest() == cache.pack_code_digest()
    with open(tmp_path / "backends" / "joint_qkv.py", "a") as f:
        f.write("\n# an update\n")
    updated = cache.code_digest(tmp_path)
    assert updated != cache.code_digest()
    a, o3 = torch.nn.Linear(8, 8), CompileOptions.from_user("inductor", "O3")
    before = cache_key(a, o3, "cpu")
    monkeypatch.setattr(cache, "pack_code_digest", lambda: updated)  # as a process of the updated pack computes it
    assert cache_key(a, o3, "cpu") != before


@pytest.mark.parametrize("action", ["info", "clear"])
def test_command_line(tmp_path, action):
    CompileCache(tmp_path).path("x").write_bytes(b"1234")
    out = subprocess.run([sys.executable, "-m", "diffboost.backends.cache", action, str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert ("removed 1 file" in out) if action == "clear" else ("x.torchcache" in out)


def test_a_second_process_loads_an_fp8_graph_with_the_gelu_handed_over_from_the_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    cold = run_child(cache_dir, tmp_path / "inductor-a", FP8_CHILD)
    assert cold["fused"] == 2 and cold["err"] < 1e-5, cold  # the last block's second layer is the output: kept
    assert cold["cache"] == "miss" and cold["fxgraph_cache_miss"] >= 1, cold
    warm = run_child(cache_dir, tmp_path / "inductor-b", FP8_CHILD)  # a new, empty inductor cache
    assert warm["cache"] == "hit" and warm["err"] < 1e-5, warm
    assert warm["fxgraph_cache_hit"] >= 1 and warm["fxgraph_cache_miss"] == 0, warm
