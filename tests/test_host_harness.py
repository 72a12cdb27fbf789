"""The test harness itself: tiny models are detected as their real architectures, graphs run in the
in-process host (events recorded, cache behaving as a server's), and a real server runs a prompt."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_models as T

SHAPES = {"sd15": [1, 4, 8, 8], "sdxl": [1, 4, 8, 8], "sd3": [1, 16, 8, 8], "pixart": [1, 4, 36, 36],
          "flux": [1, 16, 8, 8]}


def _meta_state_dict(path):
    """The file's tensors as meta tensors: detection reads only names and shapes (Flux is 0.8 GB)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


@pytest.mark.parametrize("arch", list(T.UNET_CONFIGS))
def test_tiny_model_files_are_detected_as_their_architecture(tiny_models, arch):
    import comfy.model_detection

    sd = _meta_state_dict(tiny_models.path(arch))
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    if not any(k.startswith(prefix) for k in sd):  # a bare diffusion model: what load_diffusion_model does
        prefix = ""
    assert prefix == ("model.diffusion_model." if arch in ("sd15", "sdxl") else "")
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    base_class, config_class = T.EXPECTED_CLASSES[arch]
    assert type(config).__name__ == config_class
    model = config.get_model(sd, prefix, device=torch.device("meta"))
    assert type(model).__name__ == base_class
    n_params = sum(v.numel() for k, v in sd.items() if k.startswith(prefix))
    assert n_params < (450e6 if arch == "flux" else 70e6)  # Flux: see tiny_models' docstring


def test_tiny_sd15_checkpoint_loads_with_a_taesd_vae_and_no_clip(tiny_models):
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_models.path("sd15")))
    assert type(model.model) is comfy.model_base.BaseModel
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    assert clip is None


def test_tiny_lora_patches_every_attention_projection(tiny_models):
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(str(tiny_models.path("sd15")))
    lora = comfy.utils.load_torch_file(str(tiny_models.path("sd15_lora")))
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    n_targets = sum(k.endswith(".alpha") for k in lora)
    assert n_targets == 4 * 2 * 3  # q/k/v/out of attn1 and attn2, in 3 transformer blocks
    assert len(patched.patches) == n_targets


def test_sd15_checkpoint_graph_runs_in_process_and_records_the_events(comfy_host, tiny_models):
    comfy_host.clear_captures()
    # fresh: a new executor, so the loader runs here whatever earlier tests cached
    result = comfy_host.run_prompt(T.graph("sd15", tiny_models, key="sd15"), prompt_id="harness-sd15",
                                   fresh=True).check()
    latent = comfy_host.captured_latent("sd15")
    assert list(latent.shape) == SHAPES["sd15"] and torch.isfinite(latent).all()
    image = comfy_host.captured_image("sd15_image")
    assert list(image.shape) == [1, 64, 64, 3] and torch.isfinite(image).all()
    ids = T.NODE_IDS
    assert result.outputs[ids["capture"]]["diffboost_test_capture"][0]["shape"] == SHAPES["sd15"]
    names = result.event_names
    assert names[0] == "execution_start" and "execution_success" in names
    assert {ids["loader"], ids["sampler"], ids["capture"]} <= set(result.executed_nodes)
    progress = [d for d in result.events_named("progress") if d["node"] == ids["sampler"]]
    assert [(d["value"], d["max"]) for d in progress] == [(1, 2), (2, 2)]
    assert all(d["prompt_id"] == "harness-sd15" for d in progress)
    executed = {d["node"] for d in result.events_named("executed")}
    assert ids["capture"] in executed


def test_rerunning_a_prompt_hits_the_output_cache_and_fresh_does_not(comfy_host, tiny_models):
    prompt = T.graph("sd15", tiny_models, seed=5, key="cache")
    comfy_host.run_prompt(prompt).check()
    again = comfy_host.run_prompt(prompt).check()
    assert set(again.cached_nodes) == set(prompt) and again.executed_nodes == []
    assert torch.equal(comfy_host.captured_latent("cache"), comfy_host.captured_latent("cache"))
    fresh = comfy_host.run_prompt(prompt, fresh=True).check()
    assert fresh.cached_nodes == [] and set(fresh.executed_nodes) == set(prompt)


def test_validation_failure_comes_back_as_a_result(comfy_host, tiny_models):
    result = comfy_host.run_prompt(T.graph("sd15", tiny_models, steps=0))
    assert not result.success and result.validation_failed
    assert "steps" in result.error and T.NODE_IDS["sampler"] in result.node_errors


def test_execution_error_names_the_node_and_the_exception(comfy_host, tiny_models):
    prompt = T.graph("sd3", tiny_models, decode=False)
    prompt[T.NODE_IDS["positive"]]["inputs"]["arch"] = "sd15"  # SD1.5 conditioning has no pooled output
    result = comfy_host.run_prompt(prompt)
    assert not result.success and not result.validation_failed
    assert result.error_data["node_id"] == T.NODE_IDS["sampler"]
    assert result.error.startswith(f"node {T.NODE_IDS['sampler']} (KSampler): KeyError")
    assert "pooled_output" in result.error
    assert result.events_named("execution_error")


def test_nodes_inserted_on_the_model_path_are_chained(comfy_host, tiny_models):
    sampling = comfy_host.node("ModelSamplingDiscrete", sampling="eps")
    prompt = T.graph("sd15", tiny_models, insert=[sampling, lambda link: comfy_host.node(
        "ModelSamplingDiscrete", model=link, sampling="eps")], key="inserted")
    assert prompt["10"]["inputs"]["model"] == [T.NODE_IDS["loader"], 0]
    assert prompt["11"]["inputs"]["model"] == ["10", 0]
    assert prompt[T.NODE_IDS["sampler"]]["inputs"]["model"] == ["11", 0]
    result = comfy_host.run_prompt(prompt).check()
    assert {"10", "11"} <= set(result.executed_nodes) | set(result.cached_nodes)
    # The pack's node validates in the same slot (compiling is left to the pack's own tests).
    compiled = T.graph("sd15", tiny_models, insert=comfy_host.node("DiffBoostCompileModel"))
    valid, error, _, node_errors = comfy_host.validate(compiled)
    assert valid, (error, node_errors)


def test_the_pack_is_loaded_as_a_users_custom_nodes_diffboost(comfy_host):
    cls = comfy_host.node_class("DiffBoostCompileModel")
    assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.diffboost"
    assert comfy_host.pack_module_name.endswith("/custom_nodes/diffboost")
    assert comfy_host.pack_module("nodes").__name__ == comfy_host.pack_module_name + ".nodes"


def test_lora_and_controlnet_change_the_sd15_result(comfy_host, tiny_models):
    latents = {}
    for name, kwargs in (("plain", {}), ("lora", {"lora": 1.0}), ("controlnet", {"controlnet": 1.0})):
        comfy_host.run_prompt(T.graph("sd15", tiny_models, seed=11, key=name, decode=False, **kwargs)).check()
        latents[name] = comfy_host.captured_latent(name)
    assert not torch.allclose(latents["plain"], latents["lora"])
    assert not torch.allclose(latents["plain"], latents["controlnet"])


def test_the_sdxl_controlnet_loads_as_sdxls_and_changes_the_result(comfy_host, tiny_models):
    latents = {}
    for name, kwargs in (("plain", {}), ("controlnet", {"controlnet": 1.0})):
        comfy_host.run_prompt(T.graph("sdxl", tiny_models, seed=11, key=f"sdxl_{name}", decode=False,
                                      **kwargs)).check()
        latents[name] = comfy_host.captured_latent(f"sdxl_{name}")
    assert torch.isfinite(latents["controlnet"]).all()
    assert not torch.allclose(latents["plain"], latents["controlnet"])

    import comfy.controlnet

    control = comfy.controlnet.load_controlnet(str(tiny_models.path("sdxl_controlnet")))
    assert control.control_model.label_emb is not None  # SDXL's size/crop conditioning: detected as SDXL
    assert control.control_model.input_blocks[0][0].in_channels == 4


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "pixart", "flux"])
def test_each_architecture_samples_eager_in_process(comfy_host, tiny_models, arch):
    result = comfy_host.run_prompt(T.graph(arch, tiny_models, key=arch)).check()
    latent = comfy_host.captured_latent(arch)
    assert list(latent.shape) == SHAPES[arch] and torch.isfinite(latent).all()
    assert result.outputs[T.NODE_IDS["capture_image"]]["diffboost_test_capture"][0]["finite"]


def test_real_server_runs_the_tiny_sd15_graph(comfy_server, tiny_models):
    info = comfy_server.object_info("DiffBoostCompileModel")["DiffBoostCompileModel"]
    assert info["python_module"] == "custom_nodes.diffboost"
    assert not [line for line in comfy_server.import_failures() if "diffboost" in line]
    run, history = comfy_server.run(T.graph("sd15", tiny_models, key="server"))
    assert run.success, run.of_type("execution_error")
    assert run.types[0] in ("status", "execution_start")
    ids = T.NODE_IDS
    assert ids["sampler"] in {d["node"] for d in run.of_type("executing")}
    progress = [d for d in run.of_type("progress") if d["node"] == ids["sampler"]]
    assert [(d["value"], d["max"]) for d in progress] == [(1, 2), (2, 2)]
    executed = {d["node"]: d["output"] for d in run.of_type("executed")}
    assert executed[ids["capture"]]["diffboost_test_capture"][0]["shape"] == SHAPES["sd15"]
    assert history["status"]["completed"] and history["status"]["status_str"] == "success"
    assert history["outputs"][ids["capture"]]["diffboost_test_capture"][0]["finite"]
