"""Compile Model (diffboost) inside the real ComfyUI: in-process executor and a real server, tiny
random-weight models of every supported architecture, torch.compile with inductor on the CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_models as T
from helpers.compile_caches import without_compile_caches
from helpers.recompiles import GraphCount

from diffboost.measure.runner import dynamo_graph_count

# Two euler steps of a compiled fp32 model against eager on the CPU: fused kernels reorder float
# arithmetic, so results differ by rounding only.
TOLERANCE = 1e-3
ARCHITECTURES = ["sd15", "sdxl", "sd3", "pixart", "flux"]


def compile_node(**inputs):
    widgets = {"backend": "inductor", "mode": "O2", "memory_format": "preserve", "dynamic": "auto",
               "fuse_qkv": False, "on_failure": "fail", "compile_cache": "off"}
    return {"class_type": "DiffBoostCompileModel", "inputs": {**widgets, **inputs}}


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def sample(host, prompt, key="latent"):
    result = host.run_prompt(prompt).check()
    latent = host.captured_latent(key).clone()
    assert torch.isfinite(latent).all()
    return result, latent


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compiled_model_matches_eager(comfy_host, tiny_models, arch):
    _, eager = sample(comfy_host, T.graph(arch, tiny_models, decode=False))
    result, compiled = sample(comfy_host, T.graph(arch, tiny_models, insert=compile_node(), decode=False))
    assert rel_err(compiled, eager) < TOLERANCE
    text = result.outputs[str(T.FIRST_INSERTED_ID)]["text"][0]
    assert text.startswith("compiled: inductor (mode=O2)")


def test_regional_compile_of_a_dit_matches_eager(comfy_host, tiny_models):
    """`regional`: only the repeated blocks are compiled (the tiny SD3's two joint blocks, the last one
    of another layout), the rest of the model runs as it is."""
    sdpa = {"class_type": "DiffBoostTest_SdpaAttention", "inputs": {}}  # as on a GPU: one graph per block
    _, eager = sample(comfy_host, T.graph("sd3", tiny_models, insert=[sdpa], decode=False))
    torch._dynamo.reset()  # no graphs of an earlier test to reuse
    before = dynamo_graph_count()
    result, compiled = sample(comfy_host, T.graph("sd3", tiny_models, insert=[sdpa, compile_node(mode="O2:regional")],
                                                  decode=False))
    assert rel_err(compiled, eager) < TOLERANCE
    assert dynamo_graph_count() - before == 2
    assert "mode=O2:regional" in result.outputs[str(T.FIRST_INSERTED_ID + 1)]["text"][0]


def compiled_code(host, arch, models, insert) -> tuple[str, torch.Tensor]:
    """(the code inductor generated while a sampling run compiled, the run's latent)."""
    from torch._inductor.utils import run_and_get_code

    with without_compile_caches():  # a graph found in a cache on disk generates no code
        (_, latent), sources = run_and_get_code(sample, host, T.graph(arch, models, insert=insert, decode=False))
    return "\n".join(sources), latent


def test_fuse_rope_computes_flux_rope_in_the_compiled_graph(comfy_host, tiny_models):
    _, eager = sample(comfy_host, T.graph("flux", tiny_models, decode=False))
    torch._dynamo.reset()  # every graph compiled anew, so that its code is seen
    kept_code, kept = compiled_code(comfy_host, "flux", tiny_models, compile_node(mode="default"))
    assert "comfy_kitchen.apply_rope" in kept_code  # inductor cannot see into the op: a separate call
    torch._dynamo.reset()
    fused_code, fused = compiled_code(comfy_host, "flux", tiny_models, compile_node(mode="default:fuse-rope"))
    assert "comfy_kitchen" not in fused_code and fused_code.count("def call(") >= kept_code.count("def call(")
    assert rel_err(fused, eager) < TOLERANCE and rel_err(kept, eager) < TOLERANCE


def test_lora_after_compile_changes_the_output_as_without_compilation(comfy_host, tiny_models):
    lora = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": tiny_models.filename("sd15_lora"),
                                                            "strength_model": 1.0}}
    _, eager = sample(comfy_host, T.graph("sd15", tiny_models, decode=False))
    _, eager_lora = sample(comfy_host, T.graph("sd15", tiny_models, insert=[lora], decode=False))
    _, compiled = sample(comfy_host, T.graph("sd15", tiny_models, insert=[compile_node()], decode=False))
    _, compiled_lora = sample(comfy_host, T.graph("sd15", tiny_models, insert=[compile_node(), lora], decode=False))
    lora_effect = eager_lora - eager
    assert float(lora_effect.norm() / eager.norm()) > 0.05  # the LoRA really changes the image
    assert rel_err(compiled_lora - compiled, lora_effect) < 10 * TOLERANCE
    assert rel_err(compiled_lora, eager_lora) < TOLERANCE


def test_input_model_is_unchanged_and_second_run_does_not_recompile(comfy_host, tiny_models):
    eager_graph = T.graph("sd15", tiny_models, decode=False, seed=3)
    _, before = sample(comfy_host, eager_graph)
    # Compile Model on the very ModelPatcher the loader node has cached, then sample twice more.
    _, compiled = sample(comfy_host, T.graph("sd15", tiny_models, insert=compile_node(), decode=False, seed=3))
    count = GraphCount()
    result, _ = sample(comfy_host, T.graph("sd15", tiny_models, insert=compile_node(), decode=False, seed=4))
    assert str(T.FIRST_INSERTED_ID) in result.cached_nodes  # the compiled MODEL was reused ...
    assert count.new_graphs() == 0, count.why()  # ... and so was its compiled graph: no recompilation
    # The eager graph again: the sampler runs anew on the same cached loader output.
    result, after = sample(comfy_host, eager_graph)
    assert T.NODE_IDS["sampler"] in result.executed_nodes and T.NODE_IDS["loader"] in result.cached_nodes
    assert torch.equal(after, before)
    assert rel_err(compiled, before) < TOLERANCE


@pytest.mark.parametrize("inputs, message", [
    ({"backend": "tensorrt"}, "backend"),
    ({"mode": "max-optimize::cudagraphs"}, "empty part between colons"),
    ({"mode": "warp-speed"}, "unknown part 'warp-speed'"),
    ({"mode": "jit:max-autotune"}, "contradicts itself"),
])
def test_bad_input_is_rejected_with_a_clear_message_and_the_next_prompt_runs(comfy_host, tiny_models, inputs,
                                                                             message):
    result = comfy_host.run_prompt(T.graph("sd15", tiny_models, insert=compile_node(**inputs), decode=False))
    assert not result.success and message in result.error
    comfy_host.run_prompt(T.graph("sd15", tiny_models, decode=False, seed=11)).check()


@pytest.mark.parametrize("backend", ["nexfort", "oneflow"])
def test_missing_onediff_backend_fails_at_once_naming_node_and_alternative(comfy_host, tiny_models, backend):
    from diffboost.backends import registry

    if registry.get(backend).unavailable_reason() is None:
        pytest.skip(f"{backend} is installed here")
    result = comfy_host.run_prompt(T.graph("sd15", tiny_models, insert=compile_node(backend=backend),
                                           decode=False))
    assert not result.success
    assert f"Compile Model (diffboost), node {T.FIRST_INSERTED_ID}" in result.error
    assert f"backend '{backend}' needs the" in result.error and "Choose backend 'inductor'" in result.error
    comfy_host.run_prompt(T.graph("sd15", tiny_models, decode=False, seed=12)).check()


def test_flash_attn_4_where_it_cannot_run_fails_at_once_saying_what_is_missing(comfy_host, tiny_models):
    from diffboost.backends.flash_attention import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("flash-attn-4 can run here")
    result = comfy_host.run_prompt(T.graph("sd15", tiny_models, insert=compile_node(mode="O3:flash-attn-4"),
                                           decode=False))
    assert not result.success
    assert f"Compile Model (diffboost), node {T.FIRST_INSERTED_ID}" in result.error
    assert "asks for flash-attn-4, but flash-attn-4 needs a CUDA GPU" in result.error
    assert "drop 'flash-attn-4' from the mode" in result.error
    comfy_host.run_prompt(T.graph("sd15", tiny_models, decode=False, seed=13)).check()


def test_real_server_runs_a_compiled_graph(comfy_server, tiny_models):
    prompt = T.graph("sd15", tiny_models, insert=compile_node(), key="server-compiled")
    run, history = comfy_server.run(prompt)
    assert run.success, run.of_type("execution_error")
    progress = [d for d in run.of_type("progress") if d["node"] == T.NODE_IDS["sampler"]]
    assert [(d["value"], d["max"]) for d in progress] == [(1, 2), (2, 2)]
    executed = {d["node"]: d["output"] for d in run.of_type("executed")}
    compile_ui = history["outputs"][str(T.FIRST_INSERTED_ID)]
    assert compile_ui == executed[str(T.FIRST_INSERTED_ID)]
    assert compile_ui["text"][0].startswith("compiled: inductor (mode=O2)")
    assert history["outputs"][T.NODE_IDS["capture"]]["diffboost_test_capture"][0]["finite"]


def test_saved_graph_serves_a_restarted_comfyui_without_tracing_and_follows_a_lora(comfy_host, tiny_models, tmp_path,
                                                                              monkeypatch):
    """compile_cache on, one graph (SDPA attention, as on a GPU): the first run traces the denoiser call
    and saves it; after a restart (nothing compiled in memory) the model runs it from the file without
    tracing, matches eager, and a LoRA applied to the compiled model still changes the output."""
    from diffboost.backends import saved_graph

    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFBOOST_CACHE_DIR", str(cache))
    sdpa = {"class_type": "DiffBoostTest_SdpaAttention", "inputs": {}}
    lora = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": tiny_models.filename("sd15_lora"),
                                                            "strength_model": 1.0}}
    compiled_graph = T.graph("sd15", tiny_models, insert=[sdpa, compile_node(compile_cache="on")], decode=False)
    _, eager = sample(comfy_host, T.graph("sd15", tiny_models, insert=[sdpa], decode=False))
    _, eager_lora = sample(comfy_host, T.graph("sd15", tiny_models, insert=[sdpa, lora], decode=False))

    torch._dynamo.reset()
    comfy_host.run_prompt(compiled_graph, fresh=True).check()
    assert rel_err(comfy_host.captured_latent("latent"), eager) < TOLERANCE
    assert len(list(cache.glob("*.graph"))) == 1, list(cache.iterdir())

    saved_graph._LOADED.clear()  # as after a restart: nothing compiled or loaded in memory
    torch._dynamo.reset()
    before = dynamo_graph_count()
    comfy_host.run_prompt(compiled_graph, fresh=True).check()
    assert dynamo_graph_count() == before, "after the restart the model was traced again instead of loading its graph"
    assert rel_err(comfy_host.captured_latent("latent"), eager) < TOLERANCE

    with_lora = T.graph("sd15", tiny_models, insert=[sdpa, compile_node(compile_cache="on"), lora], decode=False)
    _, compiled_lora = sample(comfy_host, with_lora)
    assert dynamo_graph_count() == before  # the LoRA's weights are the saved graph's inputs
    assert rel_err(compiled_lora, eager_lora) < TOLERANCE and rel_err(eager_lora, eager) > 0.05
