"""Conditioning moved to the model's device once per sampling run (nodes/conditioning.py), with
ComfyUI's own conditioning classes, its CFGGuider and a real sampling run.

The CPU has no second device to copy to, so the move itself is checked with the meta device; the
sampling run checks that the wrapper is in place on a diffboost model and changes nothing there."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(comfy_host):
    import comfy.model_management

    from diffboost.bench import models

    return models.build("tiny-sd15", comfy.model_management.get_torch_device(), seed=0)


def some_conds():
    import comfy.conds

    return {"c_crossattn": comfy.conds.CONDCrossAttn(torch.randn(1, 77, 8)),
            "c_size": comfy.conds.CONDRegular(torch.tensor([[64.0, 64.0]])),
            "strength": comfy.conds.CONDConstant(0.5),
            "several": comfy.conds.CONDList([torch.ones(2)])}


def test_moved_to_moves_the_tensors_and_leaves_the_original_as_it_was(comfy_host):
    import comfy.conds

    from diffboost.nodes.conditioning import moved_to

    conds = some_conds()
    tensors = {k: c.cond for k, c in conds.items()}
    moved = moved_to(conds, torch.device("meta"))
    assert isinstance(moved["c_crossattn"], comfy.conds.CONDCrossAttn)  # same kind: same concat rules
    assert moved["c_crossattn"].cond.device.type == "meta" and moved["c_size"].cond.device.type == "meta"
    assert moved["c_size"].cond.shape == (1, 2)
    assert moved["strength"] is conds["strength"] and moved["several"] is conds["several"]  # nothing to move
    assert all(conds[k].cond is tensors[k] for k in conds)  # the caller's conditioning is untouched
    assert conds["c_crossattn"].cond.device.type == "cpu"
    same_device = moved_to(conds, torch.device("cpu"))
    assert all(same_device[k] is conds[k] for k in conds)  # already there: no copy at all


def test_sampler_sees_conditioning_on_the_model_device_and_the_guider_gets_its_own_back(tiny):
    import comfy.samplers

    from diffboost.nodes.conditioning import conditioning_on_device

    patcher = tiny.patcher.clone()
    patcher.load_device = torch.device("meta")  # where the model would run: a device other than the CPU's
    guider = comfy.samplers.CFGGuider(patcher)
    positive, negative = {"model_conds": some_conds(), "uuid": "p"}, {"model_conds": some_conds(), "uuid": "n"}
    guider.conds = {"positive": [positive], "negative": [negative]}
    lists = dict(guider.conds)
    seen = {}

    def sampler(g, sigmas):
        for kind, (entry,) in g.conds.items():
            seen[kind] = {k: c.cond.device.type for k, c in entry["model_conds"].items()
                          if isinstance(c.cond, torch.Tensor)}
            assert entry["uuid"] == kind[0]  # the entry's other keys are kept
        return sigmas * 2

    assert torch.equal(conditioning_on_device(sampler, guider, torch.ones(2)), torch.full((2,), 2.0))
    assert seen["positive"] == seen["negative"] == {"c_crossattn": "meta", "c_size": "meta"}
    assert guider.conds == lists and all(guider.conds[k] is lists[k] for k in lists)  # its own lists, as they were
    assert lists["positive"] == [positive] and lists["negative"] == [negative]

    def failing(g, sigmas):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        conditioning_on_device(failing, guider, torch.ones(2))
    assert guider.conds["positive"][0] is positive  # restored also when sampling stops with an error
    assert positive["model_conds"]["c_crossattn"].cond.device.type == "cpu"


def test_a_diffboost_model_samples_through_the_wrapper_with_the_same_result(tiny):
    """Quantize FP8's reference path on the CPU gives a diffboost model without compiling; its clone
    carries the wrapper, the input model does not, and sampling with or without it is identical."""
    import comfy.sample
    from comfy.patcher_extension import WrappersMP

    from diffboost.nodes.conditioning import conditioning_on_device
    from diffboost.nodes.patching import WRAPPER_KEY, with_boost
    from diffboost.quant import Fp8Quantizer, QuantConfig

    config = QuantConfig.from_user("rowwise", min_features=16, allow_reference_path=True, min_weights_millions=0.0)
    boosted = with_boost(tiny.patcher, quantizer=Fp8Quantizer(config), quantization="test")
    assert boosted.get_wrappers(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY) == [conditioning_on_device]
    assert tiny.patcher.get_wrappers(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY) == []
    calls = []

    def spy(executor, guider, *args, **kwargs):  # runs inside diffboost's wrapper
        calls.append([e["model_conds"]["c_crossattn"].cond.device for e in guider.conds["positive"]])
        return executor(guider, *args, **kwargs)

    boosted.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, "test.spy", spy)
    without = boosted.clone()
    without.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)

    def run(model):
        latent = torch.zeros(1, 4, 16, 16)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
        return comfy.sample.sample(model, noise, 2, 7.0, "euler", "simple", tiny.positive, tiny.negative, latent,
                                   seed=5, disable_pbar=True)

    assert torch.equal(run(boosted), run(without))
    assert calls == [[torch.device("cpu")]] * 2  # the sampler ran once per model, through the spy
