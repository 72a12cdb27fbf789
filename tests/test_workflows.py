"""The bundled workflows (workflows/*.json and their API twins in workflows/api/): each twin passes
ComfyUI's validate_prompt with the models named as users name them, runs on the CPU with tiny
random-weight stand-ins under those names, and matches its UI workflow node for node.

CPU runs change only sizes (64x64, 2 steps, 1 timed run), let FP8 take its reference path, and,
where a scenario says why, put random conditioning in place of text encoders too big for a CPU.
Compile Model runs as written (inductor, O3) up to torch.compile, which is stood in for by the
module itself: inductor's C++ code generation takes 2-3 minutes per tiny model on a 2-core CPU
and dynamo's tracing alone 30 s. The browser test runs the SD1.5 workflow with the real inductor
compile on a real server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import workflows as wf

NAMES = [s.name for s in wf.SCENARIOS]
BENCH = "DiffBoostBenchmarkSampler"


def _pack_installed(host, pack: str) -> bool:
    return pack != wf.IPADAPTER_PACK or "IPAdapterUnifiedLoader" in host.nodes.NODE_CLASS_MAPPINGS


def _skip_without_pack(host, scenario):
    if scenario.needs_pack and not _pack_installed(host, scenario.needs_pack):
        pytest.skip(f"{scenario.name} needs the third-party node pack {scenario.needs_pack} (cubiq), which is not "
                    "installed in this ComfyUI: its structure is checked by test_ipadapter_workflow_structure")


@pytest.fixture(scope="module")
def standins(comfy_host, tiny_models):
    import folder_paths

    s = wf.StandIns(tiny_models.root, tiny_models)  # the folders the harness' server also lists
    s.register(folder_paths, Path(folder_paths.get_input_directory()))
    return s


@pytest.fixture
def no_codegen(comfy_host, monkeypatch, tmp_path):
    """Compile Model as written (inductor, O3), with the module itself standing in for its compiled form."""
    inductor = comfy_host.pack_module("backends.inductor")

    def module_as_compiled(self, module, options, on_graph):
        on_graph()  # counted as one compiled graph
        return module

    monkeypatch.setattr(inductor.InductorBackend, "compile", module_as_compiled)
    monkeypatch.setenv("DIFFBOOST_CACHE_DIR", str(tmp_path / "compile-cache"))


def test_every_workflow_has_an_api_twin_and_a_scenario():
    ui = {p.stem for p in wf.WORKFLOWS.glob("*.json")}
    api = {p.stem for p in wf.API_DIR.glob("*.json")}
    assert ui == api == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_its_api_twin(comfy_host, name):
    ui, api = wf.ui_workflow(name), wf.api_workflow(name)
    defs = wf.node_defs(comfy_host.nodes, {n["type"] for n in ui["nodes"]})
    assert wf.same_graph(wf.ui_to_api(ui, defs), api) == []


@pytest.mark.parametrize("name", NAMES)
def test_workflow_routes_the_model_through_compile_into_the_benchmark(name):
    api = wf.api_workflow(name)
    by_type = {n["class_type"]: k for k, n in api.items()}
    compile_id, bench_id = by_type["DiffBoostCompileModel"], by_type[BENCH]
    assert api[bench_id]["inputs"]["model"] == [compile_id, 0]
    # The measured best per architecture (benchmarks/RESULTS.md): Flux compiled block by block is as
    # fast as the whole model and compiles in a seventh of the time; the others are 3% faster whole.
    best = {"flux": "O3:regional"}
    assert api[compile_id]["inputs"]["mode"] == best.get(wf.BY_NAME[name].arch, "O3")
    assert ("DiffBoostQuantizeFP8" in by_type) == (wf.BY_NAME[name].arch in ("flux", "sd3"))
    decode = next(k for k, n in api.items() if n["class_type"] == "VAEDecode")
    assert api[decode]["inputs"]["samples"] == [bench_id, 0]
    assert any(n["class_type"] == "SaveImage" and n["inputs"]["images"] == [decode, 0] for n in api.values())


def test_ipadapter_workflow_structure():
    """Checked without the pack: the IP-Adapter nodes sit between the checkpoint and Compile Model."""
    api = wf.api_workflow("sdxl_ipadapter_1024")
    by_type = {n["class_type"]: k for k, n in api.items()}
    loader, apply, ckpt = by_type["IPAdapterUnifiedLoader"], by_type["IPAdapter"], by_type["CheckpointLoaderSimple"]
    links = wf.links_of(api)
    assert (loader, "model", ckpt, 0) in links
    assert (apply, "model", loader, 0) in links and (apply, "ipadapter", loader, 1) in links
    assert (apply, "image", by_type["LoadImage"], 0) in links
    assert (by_type["DiffBoostCompileModel"], "model", apply, 0) in links
    assert api[loader]["inputs"]["preset"] in wf.IPADAPTER_PRESETS
    defs = wf.THIRD_PARTY_NODE_DEFS["IPAdapter"]["input"]["required"]
    assert set(api[apply]["inputs"]) == set(defs)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_passes_validation_with_the_usual_file_names(comfy_host, standins, name):
    scenario = wf.BY_NAME[name]
    _skip_without_pack(comfy_host, scenario)
    standins.ensure(scenario)
    valid, error, _, node_errors = comfy_host.validate(wf.api_workflow(name))
    assert valid, f"{error} {node_errors}"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_on_cpu_with_tiny_stand_ins(comfy_host, standins, no_codegen, name):
    import folder_paths

    scenario = wf.BY_NAME[name]
    _skip_without_pack(comfy_host, scenario)
    standins.ensure(scenario)
    prompt = wf.cpu_prompt(scenario)
    result = comfy_host.run_prompt(prompt)
    assert result.success, result.error
    bench_id = next(k for k, n in prompt.items() if n["class_type"] == BENCH)
    stats = result.outputs[bench_id]["diffboost_stats"][0]
    assert stats["status"] == "done" and stats["timed_runs_done"] == 1 and stats["steps"] == 2
    assert "compiled: inductor (mode=O3" in stats["model_state"]
    if any(n["class_type"] == "DiffBoostQuantizeFP8" for n in prompt.values()):
        assert "fp8" in stats["model_state"].lower(), stats["model_state"]
    assert math.isfinite(stats["spread"]["it_per_s"]["median"])
    image = result.outputs[next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")]["images"][0]
    assert (Path(folder_paths.get_output_directory()) / image["subfolder"] / image["filename"]).is_file()


def test_templates_list_the_ui_workflows_and_not_the_api_twins(comfy_server):
    listed = comfy_server.get_json("/workflow_templates")
    assert sorted(listed[wf.PACK_NAME]) == sorted(NAMES)
    served = comfy_server.get_json(f"/api/workflow_templates/{wf.PACK_NAME}/{NAMES[0]}.json")
    assert served == wf.ui_workflow(NAMES[0])
