"""Quantize FP8 inside the real ComfyUI host (in-process executor, tests/helpers) on the tiny SD1.5
checkpoint, with the tiny LoRA file through LoraLoaderModelOnly. The CPU has no FP8 tensor cores,
so graphs set allow_reference_path: the same quantized operands, multiplied in float32."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_models as T
from helpers.recompiles import GraphCount

MIN_FEATURES = 256  # the tiny SD1.5's attention and feed-forward layers have 320 features on one side
QUANT, SINK = "10", "30"  # the first inserted node's id (tiny_models.FIRST_INSERTED_ID); the model sink
KEPT_MODELS: dict[str, object] = {}


class KeepModel:
    """Test-only output node: keeps the MODEL it gets, to look at what Quantize FP8 attached."""

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing/diffboost"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def keep(self, model):
        KEPT_MODELS["model"] = model
        return {}


# One entry per sampling run of DropCloneMidCall: whether the FP8 weights were all there right after
# another clone of the quantized model was deleted in the middle of a model call.
WEIGHTS_AFTER_DROP: list[bool] = []


class DropCloneMidCall:
    """Test-only node: returns a clone of the model whose first attention call deletes another clone
    (ComfyUI detaches a deleted clone, which frees its FP8 weights) while the model call is running."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "_for_testing/diffboost"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def apply(self, model):
        import gc

        from diffboost.quant import fp8_layers

        layers = fp8_layers(model.model_options["diffboost"].denoiser)
        other = {"clone": model.clone()}

        def attn1_patch(q, k, v, extra_options):
            if other.pop("clone", None) is not None:  # the last reference: deleted here
                gc.collect()
                WEIGHTS_AFTER_DROP.append(all(layer.weight_fp8 is not None for layer in layers))
            return q, k, v

        m = model.clone()
        m.set_model_attn1_patch(attn1_patch)
        return (m,)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: a second thread only waits for the CPU (ops took 8 ms instead of 20 us on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def host(comfy_host):
    comfy_host.nodes.NODE_CLASS_MAPPINGS["DiffBoostTestKeepModel"] = KeepModel
    comfy_host.test_nodes["DiffBoostTestKeepModel"] = KeepModel  # survives the harness re-owning the mapping
    comfy_host.nodes.NODE_CLASS_MAPPINGS["DiffBoostTestDropCloneMidCall"] = DropCloneMidCall
    comfy_host.test_nodes["DiffBoostTestDropCloneMidCall"] = DropCloneMidCall
    yield comfy_host
    # A model still kept at interpreter exit is deleted after ComfyUI's modules are torn down, where
    # its detach fails noisily.
    KEPT_MODELS.clear()


def quantize(host, **inputs):
    """An insert for tiny_models.graph: Quantize FP8 with the reference path and the tiny model's threshold."""
    inputs = {"min_features": MIN_FEATURES, "min_weights_millions": 0.0, "allow_reference_path": True, **inputs}
    return lambda link: host.node("DiffBoostQuantizeFP8", model=link, **inputs)


def lora(host, strength: float = 1.0):
    return lambda link: {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": link, "lora_name": host.models.filename("sd15_lora"), "strength_model": strength}}


def sample(host, insert=None, lora_strength=None) -> tuple[torch.Tensor, object]:
    """Sample the tiny SD1.5 (2 steps, cfg 1) through `insert`; returns the final latent and the Result."""
    prompt = T.graph("sd15", host.models, insert=insert, lora=lora_strength, cfg=1.0, decode=False)
    result = host.run_prompt(prompt, fresh=True).check()  # fresh: no cached latent from an earlier prompt
    return host.captured_latent().clone(), result


def chosen_layers(host, **inputs) -> tuple[set[str], str]:
    """The layers Quantize FP8 picks (names in the denoiser) and its ui text; loads, does not sample."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.models.filename("sd15")}},
              QUANT: quantize(host, **inputs)(["1", 0]), SINK: host.node("DiffBoostTestKeepModel", model=[QUANT, 0])}
    result = host.run_prompt(prompt, fresh=True).check()
    state = KEPT_MODELS["model"].model_options["diffboost"]
    layers = host.pack_module("quant").fp8_layers(state.denoiser)
    names = {name for name, m in state.denoiser.named_modules() if any(m is layer for layer in layers)}
    return names, result.outputs[QUANT]["text"][0]


def failure(host, **inputs) -> str:
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.models.filename("sd15")}},
              "7": quantize(host, **inputs)(["1", 0]), SINK: host.node("DiffBoostTestKeepModel", model=["7", 0])}
    result = host.run_prompt(prompt, fresh=True)
    assert not result.success and not result.validation_failed, result.error
    return result.error


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_quantized_clone_runs_and_leaves_the_input_model_bit_for_bit_unchanged(host):
    plain, _ = sample(host)
    quantized, result = sample(host, quantize(host))
    again, _ = sample(host)
    assert torch.equal(plain, again)
    assert 0 < rel(quantized, plain) < 0.1, rel(quantized, plain)  # random weights: 0.04 measured
    text = result.outputs[QUANT]["text"][0]
    assert "Quantized 24 of 36 Linear layers to FP8" in text and "slow reference path" in text


def test_ignore_list_threshold_and_config_file_change_the_chosen_layers(host, tmp_path):
    from diffboost.quant import DEFAULT_IGNORE

    default, text = chosen_layers(host)
    # 3 transformer blocks x (q, k, v, out of self-attention, q, out of cross-attention, 2 feed-forward);
    # the timestep layers and the cross-attention keys and values (text tokens only) are ignored.
    assert len(default) == 24 and all(".transformer_blocks.0." in n for n in default), default
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in default)
    assert "Kept 12 (ignore list): time_embed.0, time_embed.2, input_blocks.1.0.emb_layers.1" in text
    assert "first/last layer" not in text  # SD1.5 starts and ends with convolutions

    no_ff, _ = chosen_layers(host, ignore=DEFAULT_IGNORE + ",\n*.ff.*")
    assert no_ff == {n for n in default if ".ff." not in n} and len(no_ff) == 18
    nothing, text = chosen_layers(host, min_features=512)  # every layer has 320 features on one side
    assert nothing == set() and "Quantized 0 of 36" in text

    config = tmp_path / "fp8.json"
    config.write_text(json.dumps({"*.attn2": False, "*.ff.net.2": {"quant_type": "weight_only"}}))
    from_file, text = chosen_layers(host, config_path=str(config))
    assert from_file == {n for n in default if ".attn2." not in n}
    assert "Kept 12 (config file)" in text and "By type: W8A8 rowwise 15, weight-only 3" in text


def test_bad_config_file_bad_type_and_bad_pattern_fail_naming_the_node(host, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"*.attn1": {"quant_type": "int4"}')
    msg = failure(host, config_path=str(bad))
    assert "Quantize FP8 (diffboost), node 7: config file" in msg and "is not valid JSON" in msg
    bad.write_text('{"*.attn1": {"quant_type": "int4"}}')
    msg = failure(host, config_path=str(bad))
    assert "node 7" in msg and "quant_type 'int4' is not a known FP8 quantization type" in msg
    msg = failure(host, config_path=str(tmp_path / "missing.json"))
    assert "node 7" in msg and "missing.json does not exist" in msg
    msg = failure(host, ignore="re:attn1(")
    assert "node 7" in msg and "not a valid regular expression" in msg


def test_fp8_matmul_on_the_cpu_without_the_reference_path_says_there_are_no_tensor_cores(host):
    msg = failure(host, allow_reference_path=False)
    assert "Quantize FP8 (diffboost), node 7" in msg and "no FP8 tensor cores" in msg
    assert "allow_reference_path" in msg and "fp8 weight-only" in msg
    # weight-only needs no FP8 matmul: it runs without the reference path.
    weight_only, _ = sample(host, quantize(host, allow_reference_path=False, quant_type="fp8 weight-only"))
    assert rel(weight_only, sample(host)[0]) < 0.1


def test_lora_before_or_after_quantize_is_in_the_fp8_weights(host):
    plain, _ = sample(host)
    with_lora, _ = sample(host, lora_strength=1.0)
    lora_then_fp8, _ = sample(host, quantize(host), lora_strength=1.0)  # the loader sits before inserted nodes
    fp8_then_lora, _ = sample(host, [quantize(host), lora(host, 1.0)])
    fp8_only, _ = sample(host, quantize(host))
    other_strength, _ = sample(host, [quantize(host), lora(host, 0.5)])

    # Measured: LoRA effect 0.47, FP8 error 0.05 with the LoRA and 0.02 without.
    lora_effect = rel(plain, with_lora)
    assert lora_effect > 0.3, lora_effect  # so that FP8 rounding cannot hide whether the LoRA is there
    assert rel(lora_then_fp8, with_lora) < 0.25 * lora_effect, (rel(lora_then_fp8, with_lora), lora_effect)
    assert torch.equal(lora_then_fp8, fp8_then_lora)  # either order: the same patched weights quantized
    assert rel(fp8_only, plain) < 0.25 * lora_effect  # the LoRA is gone again with its patches
    assert rel(other_strength, with_lora) > 0.25 * lora_effect  # a new strength is quantized anew
    assert torch.equal(sample(host)[0], plain)  # and the shared model is back to its own weights


def test_quantize_before_or_after_compile_model_gives_the_same_output(host):
    import torch._dynamo

    torch._dynamo.reset()

    def compile_model(link):
        return host.node("DiffBoostCompileModel", model=link, backend="inductor", mode="default",
                         on_failure="fail", compile_cache="off")

    eager, _ = sample(host, quantize(host))
    after, result = sample(host, [compile_model, quantize(host)])
    before, _ = sample(host, [quantize(host), compile_model])
    assert rel(before, after) < 1e-5, rel(before, after)  # the same denoiser: quantized, then compiled
    # Measured 0.012: compiled activations differ from eager ones by ~1e-6, which flips the FP8 rounding of a
    # few elements; 2 steps of a random-weight UNet amplify that (unquantized, compiled vs eager is 1e-6).
    assert rel(after, eager) < 0.05, rel(after, eager)
    text = result.outputs["11"]["text"][0]
    assert "FP8: W8A8 rowwise, 24/36 Linear layers" in text and "compiled: inductor" in text


def compile_default(host):
    return lambda link: host.node("DiffBoostCompileModel", model=link, backend="inductor", mode="default",
                                  on_failure="fail", compile_cache="off")


def run_counting_graphs(host, prompt, fresh: bool = False) -> tuple[int, torch.Tensor]:
    """(graphs dynamo captured for running `prompt`, the final latent): GraphCount.new_graphs."""
    count = GraphCount()
    host.run_prompt(prompt, fresh=fresh).check()
    return count.new_graphs(), host.captured_latent().clone()


def test_fp8_and_compile_rerun_by_an_upstream_lora_change_reuse_their_graphs(host):
    """LoRA -> Quantize FP8 -> Compile Model: a new LoRA strength runs both nodes again on the same
    diffusion model. They reuse the quantized stand-in and its graphs, which quantize the new weights."""
    torch._dynamo.reset()

    def prompt(strength, compiled=True):
        insert = [quantize(host), compile_default(host)] if compiled else [quantize(host)]
        return T.graph("sd15", host.models, insert=insert, lora=strength, cfg=1.0, decode=False)

    first_graphs, at_1 = run_counting_graphs(host, prompt(1.0), fresh=True)
    graphs, at_half = run_counting_graphs(host, prompt(0.5))
    assert first_graphs > 0 and graphs == 0, (first_graphs, graphs)
    assert rel(at_half, at_1) > 0.1, rel(at_half, at_1)  # the new strength is in the output
    # A compile from scratch (as in a new process: nothing to reuse) gives the very same latent.
    torch._dynamo.reset()
    fresh_graphs, fresh_at_half = run_counting_graphs(host, prompt(0.5), fresh=True)
    assert fresh_graphs > 0 and torch.equal(at_half, fresh_at_half)
    eager_at_half, _ = sample(host, quantize(host), lora_strength=0.5)
    assert rel(at_half, eager_at_half) < 0.05  # compiled FP8 against eager FP8, as above


def test_fp8_weights_are_freed_when_comfyui_drops_the_quantized_model(host):
    """The quantized stand-in is kept for reuse while its diffusion model lives; its FP8 weights are
    not: when ComfyUI drops Quantize FP8's output, they go, and come back at the next quantized run."""
    keep = {SINK: host.node("DiffBoostTestKeepModel", model=[T.NODE_IDS["loader"], 0])}  # holds the model

    def prompt():
        return {**T.graph("sd15", host.models, insert=[quantize(host)], cfg=1.0, decode=False), **keep}

    host.run_prompt(prompt(), fresh=True).check()
    first = host.captured_latent().clone()
    root = KEPT_MODELS["model"].get_model_object("diffusion_model")
    (standin,) = host.pack_module("quant.standin")._STANDINS[root].values()
    layers = host.pack_module("quant").fp8_layers(standin)
    assert len(layers) == 24 and all(layer.weight_fp8 is not None for layer in layers)

    # A prompt that samples nothing: ComfyUI's cache drops the quantized model, keeps the loader's, and
    # unloads nothing (so no detach callback runs).
    loader = T.NODE_IDS["loader"]
    host.run_prompt({loader: prompt()[loader], **keep}).check()
    import gc

    gc.collect()
    assert KEPT_MODELS["model"].get_model_object("diffusion_model") is root
    assert all(layer.weight_fp8 is None for layer in layers), "FP8 weights outlived the quantized model"
    host.run_prompt(prompt()).check()
    (again,) = host.pack_module("quant.standin")._STANDINS[root].values()
    assert again is standin and all(layer.weight_fp8 is not None for layer in layers)
    assert torch.equal(host.captured_latent(), first)


def test_fp8_weights_stay_between_sampling_runs_and_go_when_comfyui_unloads_the_model(host, monkeypatch):
    """ComfyUI detaches a loaded model at the start of every sampling run and seats it again: the FP8
    weights stay (the same tensors, not quantized again). When ComfyUI unloads the model, they go."""
    import time

    import comfy.model_management

    monkeypatch.setattr(host.pack_module("nodes.fp8_lifetime"), "SEATED_CHECK_S", 0.5)  # well after a re-seat
    keep = {SINK: host.node("DiffBoostTestKeepModel", model=[T.NODE_IDS["loader"], 0])}  # holds the model

    def prompt(seed):
        return {**T.graph("sd15", host.models, insert=[quantize(host)], seed=seed, cfg=1.0, decode=False), **keep}

    host.run_prompt(prompt(0), fresh=True).check()
    root = KEPT_MODELS["model"].get_model_object("diffusion_model")
    (standin,) = host.pack_module("quant.standin")._STANDINS[root].values()
    layers = host.pack_module("quant").fp8_layers(standin)
    made = [layer.weight_fp8 for layer in layers]
    assert len(made) == 24 and all(w is not None for w in made)

    host.run_prompt(prompt(1)).check()  # a new seed: KSampler samples again with the cached quantized model
    time.sleep(1.5)  # past the look at what is loaded after the detach
    assert all(layer.weight_fp8 is w for layer, w in zip(layers, made, strict=True)), "quantized again"

    comfy.model_management.unload_all_models()
    assert all(layer.weight_fp8 is None for layer in layers), "FP8 weights outlived the unload"
    host.run_prompt(prompt(2)).check()
    assert all(layer.weight_fp8 is not None for layer in layers)


def test_fp8_weights_go_when_another_clone_takes_the_quantized_models_place(host, monkeypatch):
    """The quantized model stays alive, but a clone of the same checkpoint without FP8 is sampled (and
    loaded) in its place: the FP8 weights are freed a moment later, and come back when it runs again."""
    import time

    monkeypatch.setattr(host.pack_module("nodes.fp8_lifetime"), "SEATED_CHECK_S", 0.5)  # well after a re-seat
    quantized = {**T.graph("sd15", host.models, insert=[quantize(host)], cfg=1.0, decode=False),
                 SINK: host.node("DiffBoostTestKeepModel", model=[QUANT, 0])}
    host.run_prompt(quantized, fresh=True).check()
    first = host.captured_latent().clone()
    kept = KEPT_MODELS["model"]  # the quantized model, alive through the next prompt
    layers = host.pack_module("quant").fp8_layers(kept.model_options["diffboost"].denoiser)
    assert layers and all(layer.weight_fp8 is not None for layer in layers)

    host.run_prompt(T.graph("sd15", host.models, cfg=1.0, decode=False, seed=1)).check()  # the plain model
    time.sleep(1.5)
    assert all(layer.weight_fp8 is None for layer in layers), "FP8 weights held while another clone was loaded"
    host.run_prompt(quantized).check()
    assert all(layer.weight_fp8 is not None for layer in layers)
    assert torch.equal(host.captured_latent(), first)
    del kept


# A quantized model that Python collects only as the process ends (held in a reference cycle).
ENDING_PROCESS = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its options from the command line
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_patcher
from diffboost.nodes.fp8_lifetime import add_fp8_callbacks
from diffboost.nodes.patching import STATE_KEY, BoostState
from diffboost.quant import QuantConfig, fp8_layers, quantized_standin
net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(3)])
config = QuantConfig.from_user("rowwise", min_features=16, min_weights_millions=0, keep_first_last=False,
                               allow_reference_path=True)
patcher = comfy.model_patcher.ModelPatcher(net, torch.device("cpu"), torch.device("cpu"))
patcher.model_options[STATE_KEY] = BoostState(denoiser=quantized_standin(net, config))
add_fp8_callbacks(patcher)
patcher.itself = patcher
print(len(fp8_layers(patcher.model_options[STATE_KEY].denoiser)))
"""


def test_a_process_ending_with_a_quantized_model_alive_exits(comfy_path):
    """ComfyUI detaches a model patcher that Python collects as the process ends; the look after a
    detach must not start a thread then (Python 3.11 waited forever for it to start)."""
    done = subprocess.run([sys.executable, "-c", ENDING_PROCESS, str(comfy_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["3"]  # the model was quantized, so its detach looked at FP8 weights


def test_a_clone_deleted_during_a_model_call_leaves_the_fp8_weights_in_use(host):
    """Clones share the quantized stand-in; one deleted while another runs must not free its FP8 weights."""
    WEIGHTS_AFTER_DROP.clear()
    plain, _ = sample(host, quantize(host))
    dropped, _ = sample(host, [quantize(host), lambda link: host.node("DiffBoostTestDropCloneMidCall", model=link)])
    assert WEIGHTS_AFTER_DROP == [True], WEIGHTS_AFTER_DROP
    assert torch.equal(dropped, plain)


def test_fp8_model_loaded_again_compiles_nothing(host):
    """A new diffusion model of the same layout (the checkpoint loaded again) gets a new quantized stand-in,
    of the same class and layout: the graphs compiled for the first one serve it."""
    torch._dynamo.reset()
    prompt = T.graph("sd15", host.models, insert=[quantize(host), compile_default(host)], cfg=1.0, decode=False)
    first_graphs, first = run_counting_graphs(host, prompt, fresh=True)
    graphs, again = run_counting_graphs(host, prompt, fresh=True)  # a new executor loads the checkpoint anew
    assert first_graphs > 0 and graphs == 0, (first_graphs, graphs)
    assert torch.equal(again, first)
