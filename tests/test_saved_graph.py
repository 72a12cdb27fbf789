"""Saved graphs, engine level: a second process runs the compiled call without tracing the model
again, and uses a saved graph only where it still applies (same code, same inputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffboost.backends import saved_graph
from diffboost.backends.saved_graph import signature

pytestmark = pytest.mark.skipif(not saved_graph.supported(), reason="this torch cannot save a compiled call")

# The model lives in its own file, so a test can change its code between two processes.
MODEL = textwrap.dedent("""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x, transformer_options={}):
            return torch.nn.functional.gelu(self.proj(x)) * SCALE

    SCALE = 1.0

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(4)])

        def forward(self, x, transformer_options={}):
            for block in self.blocks:
                x = x + block(x, transformer_options)
            return x
""")

# Runs in a fresh process with its own empty inductor cache: only diffboost's cache can help.
CHILD = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import compilation_time_metrics, counters
    from diffboost.backends import CompileCache, CompileOptions, compile_module
    sys.path.insert(0, sys.argv[2])
    from boosted_model import Model
    torch.manual_seed(0)
    model = Model()
    compiled = compile_module(model, CompileOptions.from_user("inductor", sys.argv[4], dynamic="off"),
                              cache=CompileCache(sys.argv[1]))
    with torch.no_grad():
        for rows in map(int, sys.argv[3].split(",")):  # each row count in turn, the last one checked
            x = torch.randn(rows, 64)
            out = compiled(x, transformer_options={"patches": {}})
            again = compiled(x, transformer_options={"patches": {}})
            err = float((out - model(x, {"patches": {}})).abs().max())
    print(json.dumps({**compiled.stats.as_dict(), "err": err, "repeat_err": float((again - out).abs().max()),
                      "graphs_traced": counters["stats"]["unique_graphs"], "events": compiled.stats.events,
                      "saving_s": sum(compilation_time_metrics.get("diffboost.save_saved_graph", []))}))
""")


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "boosted_model.py").write_text(MODEL)
    return folder


def run_child(cache_dir, inductor_dir, model_dir, rows: str = "8", mode: str = "default", **env_changes) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "0",
           **env_changes}
    done = subprocess.run([sys.executable, "-c", CHILD, str(cache_dir), str(model_dir), rows, mode], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# The presets too: each of their inductor settings must survive being saved and loaded back (a
# setting that did not, multi-kernel, made a new process run the model uncompiled on the GPU).
@pytest.mark.parametrize("mode", ["default", "O3"])
def test_second_process_runs_the_saved_graph_without_tracing(tmp_path, model_dir, mode):
    cache_dir = tmp_path / "cache"
    cold = run_child(cache_dir, tmp_path / "inductor-a", model_dir, mode=mode)
    assert cold["saved_graph"] == "saved" and cold["graphs_compiled"] == 1 and cold["failure"] is None, cold
    assert cold["err"] < 1e-5 and cold["repeat_err"] == 0
    assert len(list(cache_dir.glob("*.graph"))) == 1
    assert cold["saving_s"] > 0  # a cold compile's report says what writing the graph cost

    warm = run_child(cache_dir, tmp_path / "inductor-b", model_dir, mode=mode)  # a new, empty inductor cache
    assert warm["saved_graph"] == "loaded" and warm["failure"] is None, warm
    assert warm["graphs_compiled"] == 0 and warm["graphs_traced"] == 0, warm  # nothing traced, nothing compiled
    assert warm["saving_s"] == 0
    assert warm["err"] < 1e-5


def test_other_inputs_take_the_usual_compile(tmp_path, model_dir):
    """One graph is saved per process, for its first call; later inputs that no saved graph fits
    compile the usual way (dynamo, its guards, its recompiles) and run correctly."""
    cache_dir = tmp_path / "cache"
    both = run_child(cache_dir, tmp_path / "inductor-a", model_dir, rows="8,16")
    assert both["saved_graph"] == "saved" and both["graphs_compiled"] == 2 and both["graphs_traced"] == 2, both
    assert both["err"] < 1e-5 and len(list(cache_dir.glob("*.graph"))) == 1
    # A new process whose first call has 16 rows saves a graph of its own; the 8-row one still loads.
    other = run_child(cache_dir, tmp_path / "inductor-b", model_dir, rows="16,8")
    assert other["saved_graph"] == "saved" and other["graphs_compiled"] == 1 and other["err"] < 1e-5, other
    assert len(list(cache_dir.glob("*.graph"))) == 2


def test_saved_graphs_can_be_turned_off(tmp_path, model_dir):
    cache_dir = tmp_path / "cache"
    off = run_child(cache_dir, tmp_path / "inductor-a", model_dir, DIFFBOOST_SAVED_GRAPHS="0")
    assert off["saved_graph"] == "" and off["graphs_compiled"] == 1 and off["err"] < 1e-5, off
    assert not list(cache_dir.glob("*.graph")) and list(cache_dir.glob("*.torchcache"))


def test_multi_kernel_compiles_keep_no_saved_graph(tmp_path):
    """torch 2.11 cannot load a multi-kernel graph back in a new process: such compiles save none."""
    from diffboost.backends import CompileOptions
    from diffboost.backends.inductor import InductorBackend

    def saved(mode):
        return InductorBackend().saved_graphs(torch.nn.Linear(4, 4), CompileOptions.from_user("inductor", mode),
                                              lambda: None, tmp_path, "key")

    assert saved("O3") is not None and saved("O3:multi-kernel") is None


def test_changed_model_code_makes_the_saved_graph_stale(tmp_path, model_dir):
    cache_dir = tmp_path / "cache"
    run_child(cache_dir, tmp_path / "inductor-a", model_dir)
    (model_dir / "boosted_model.py").write_text(MODEL.replace("* SCALE", "* SCALE * 2.0"))
    changed = run_child(cache_dir, tmp_path / "inductor-b", model_dir)
    # the old graph would compute the old code: it is set aside, and the new code compiled and saved
    assert changed["saved_graph"] == "saved" and changed["err"] < 1e-5, changed
    assert any("code changed" in e for e in changed["events"]), changed["events"]
    assert len(list(cache_dir.glob("*.broken"))) == 1


def test_corrupt_saved_graph_is_set_aside_and_rebuilt(tmp_path, model_dir):
    cache_dir = tmp_path / "cache"
    run_child(cache_dir, tmp_path / "inductor-a", model_dir)
    (saved,) = cache_dir.glob("*.graph")
    saved.write_bytes(b"not a saved graph")
    rebuilt = run_child(cache_dir, tmp_path / "inductor-b", model_dir)
    assert rebuilt["saved_graph"] == "saved" and rebuilt["err"] < 1e-5, rebuilt
    assert len(list(cache_dir.glob("*.broken"))) == 1 and len(list(cache_dir.glob("*.graph"))) == 1


def test_signature_names_what_the_guards_check():
    x = torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    base = signature(((x,), {"transformer_options": {"patches": {}, "sigmas": torch.ones(3)}}))
    assert base == signature(((x,), {"transformer_options": {"patches": {}, "sigmas": torch.ones(7)}})), \
        "the sampler's per-prompt entries must not name another graph"
    assert base != signature(((x[:1],), {"transformer_options": {"patches": {}}}))
    assert base != signature(((x.float(),), {"transformer_options": {"patches": {}}}))
    assert base != signature(((x,), {"transformer_options": {"patches": {"attn2_patch": [1]}}}))
