"""Compilation is paid once: after a model's first compile, what users change between prompts
(resolution, batch size, steps, cfg, prompt length, LoRA, ControlNet, attention patches,
instruct-pix2pix images) runs on the graphs already built. Real ComfyUI host, tiny models, inductor
on the CPU, each scenario with GPU-like attention (one graph) and with ComfyUI's CPU attention.

A recompile is a graph torch.dynamo captures after the first compile (the count the Benchmark
Sampler reports as recompiles_dynamo), less the one that ComfyUI's CPU attention owes to the
machine's free memory (helpers/recompiles.py says why). Each test also checks that the output follows the change and
matches eager, so a stale graph or a cached result cannot pass for "no recompile"."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import tiny_models as T
from helpers import workflows as wf
from helpers.recompiles import GraphCount

from diffboost.measure.runner import dynamo_graph_count

# Two euler steps of a compiled fp32 model against eager on the CPU: rounding differences only.
TOLERANCE = 1e-3
# Tiny images with the aspect ratios of 1024x1024, 512x768, 768x512 and 832x1216. Square first: a
# compile at a square size must not assume that height and width stay equal.
SD15_SIZES = [(64, 64), (64, 96), (96, 64), (104, 152)]
# SD3 patchifies 2x2 latent pixels, so sides are multiples of 16 px: 208x304 is 832x1216 / 4.
SD3_SIZES = [(64, 64), (64, 96), (96, 64), (208, 304)]
# What CLIP gives for prompts of up to 75, 150 and 225 tokens (77 per chunk of 75, with start and end).
TOKEN_COUNTS = [77, 154, 231]
IP2P_CHECKPOINT = "instruct-pix2pix-00-22000.safetensors"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with torch.dynamo as a new process has it. Dynamo remembers which sizes changed
    in earlier compiles of the same function and starts later compiles dynamic there, which would hide
    a recompile that a user's first session pays."""
    torch._dynamo.reset()


# ComfyUI's attention as on a GPU: torch SDPA, one graph for the denoiser.
SDPA = [{"class_type": "DiffBoostTest_SdpaAttention", "inputs": {}}]


@pytest.fixture(params=["sdpa", "comfy-cpu"])
def attention(request) -> list[dict]:
    """The MODEL-path nodes that choose attention. "sdpa": torch SDPA, as ComfyUI uses on a GPU, so the
    denoiser compiles as one graph. "comfy-cpu": what ComfyUI picks on a CPU (sub-quadratic attention,
    which asks for free memory on each call: a graph break per attention, many small graphs)."""
    return SDPA if request.param == "sdpa" else []


def compile_node(dynamic: str = "auto", mode: str = "O2") -> dict:
    return {"class_type": "DiffBoostCompileModel", "inputs": {
        "backend": "inductor", "mode": mode, "memory_format": "preserve", "dynamic": dynamic, "fuse_qkv": False,
        "on_failure": "fail", "compile_cache": "off"}}


def lora_node(filename: str, strength: float) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": filename, "strength_model": strength}}


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def sample(host, prompt, *, fresh: bool = False) -> torch.Tensor:
    host.run_prompt(prompt, fresh=fresh).check()
    latent = host.captured_latent().clone()
    assert torch.isfinite(latent).all()
    return latent


def first_compile(host, prompt) -> torch.Tensor:
    """Sample on a fresh executor (no compiled model kept from another test) and check that it compiled."""
    before = dynamo_graph_count()
    latent = sample(host, prompt, fresh=True)
    assert dynamo_graph_count() > before, "the first run compiled nothing: the model is not compiled"
    return latent


def sample_counting(host, prompt) -> tuple[int, torch.Tensor]:
    """(graphs dynamo captured for sampling `prompt`, the latent): GraphCount.new_graphs."""
    count = GraphCount()
    latent = sample(host, prompt)
    return count.new_graphs(), latent


def assert_changed(a, b, what: str) -> None:
    change = rel_err(a, b)
    assert change > 0.01, f"{what} changed the output by {change:.2g} only: a stale graph or a cached result"


def check_series(host, cases: dict, *, outputs_differ: bool = True, new_variants: tuple = ()) -> list[torch.Tensor]:
    """cases: label -> (compiled prompt, the same prompt uncompiled). Samples every compiled prompt in
    turn, the first on a fresh executor (it must compile), then checks that no later one captured a graph,
    that each output follows its change (outputs_differ) and matches eager. Labels in `new_variants` run
    other denoiser code and may compile once, no more graphs than the first compile. The compiled prompts
    run back to back: ComfyUI's cache drops Compile Model's output when a prompt without it runs, and so
    the whole model: a model loaded again is compiled anew. Returns the compiled latents."""
    labels = list(cases)
    before = dynamo_graph_count()
    latents = [first_compile(host, cases[labels[0]][0])]
    first = dynamo_graph_count() - before
    new_graphs, reasons = {}, {}
    for label in labels[1:]:
        count = GraphCount()
        latents.append(sample(host, cases[label][0]))
        new_graphs[label], reasons[label] = count.new_graphs(), count.why()
    variants = {label: new_graphs.pop(label) for label in new_variants}
    assert all(n <= first for n in variants.values()), f"first compile: {first} graphs; variants: {variants}"
    assert not any(new_graphs.values()), (
        f"recompiled after the first compile: {new_graphs}; why: {reasons}")
    for i, label in enumerate(labels):
        if outputs_differ and i:
            assert_changed(latents[i], latents[i - 1], label)
        assert rel_err(latents[i], sample(host, cases[label][1])) < TOLERANCE, f"{label}: compiled != eager"
    return latents


# ------------------------------------------------------------------- the count the tests rely on

def test_a_recompile_for_free_memory_is_told_apart_from_one_for_a_change_of_shape(comfy_host):
    """The one recompile the series do not count (ComfyUI's CPU attention reading free memory) is
    recognised on ComfyUI's own function, and a recompile for a new shape is not mistaken for it."""
    import comfy.model_management as mm

    def sized_by_free_memory(x):
        y = x * 2
        free, _ = mm.get_free_memory(x.device, True)  # a graph break: psutil is not traced
        return y + (1 if free / 2**20 >= x.shape[0] else 0)

    compiled = torch.compile(sized_by_free_memory, backend="eager")
    compiled(torch.ones(4))
    count, ballast = GraphCount(), []
    for _ in range(20):  # until the free memory read differs: the kernel updates its count lazily
        ballast.append(torch.ones(16 * 2**20))  # 64 MiB more, written
        compiled(torch.ones(4))
        if count.for_free_memory() or count.new_graphs():
            break
        time.sleep(0.5)
    assert count.for_free_memory() == 1 and count.new_graphs() == 0 and not count.why(), count.why()
    count = GraphCount()
    compiled(torch.ones(5))
    assert count.for_free_memory() == 0 and count.new_graphs() == 2, count.why()  # both frames take x
    assert len(count.why()) == 2 and all("size mismatch" in why for why in count.why()), count.why()
    del ballast


# ------------------------------------------------------------------------- resolution and batch size

@pytest.mark.parametrize("arch, sizes", [("sd15", SD15_SIZES), ("sd3", SD3_SIZES)])
def test_dynamic_compile_serves_every_aspect_ratio_and_batch_size(comfy_host, tiny_models, attention, arch, sizes):
    shapes = [(w, h, 1) for w, h in sizes] + [(*sizes[0], 2)]

    def prompt(width, height, batch, compiled):
        insert = [*attention, compile_node("on")] if compiled else attention
        return T.graph(arch, tiny_models, insert=insert, width=width, height=height, batch_size=batch, decode=False)

    cases = {f"{w}x{h} batch {b}": (prompt(w, h, b, True), prompt(w, h, b, False)) for w, h, b in shapes}
    latents = check_series(comfy_host, cases, outputs_differ=False)  # the shapes differ instead
    for (width, height, batch), latent in zip(shapes, latents, strict=True):
        assert latent.shape == (batch, T.LATENT_CHANNELS[arch], height // 8, width // 8)


# Sides that are multiples of 64 px, as 1024x1024, 512x768, 768x512 and 832x1216 are: the latent goes
# to the dynamic compile as blocks of 8x8 (backends/latent_blocks.py). At least 128 px: one block high
# would be a side of 1, which torch specialises on.
BLOCK_SIZES = [(128, 128), (128, 192), (192, 128), (192, 320)]


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_dynamic_compile_with_the_latent_in_blocks_serves_every_size_and_batch(comfy_host, tiny_models, arch,
                                                                             caplog):
    """SDXL's UNet downsamples twice (where the blocks keep the sizes exact), SD3 patchifies."""
    shapes = [(w, h, 1) for w, h in BLOCK_SIZES] + [(*BLOCK_SIZES[0], 2)]

    def prompt(width, height, batch, compiled):
        insert = [*SDPA, compile_node("on")] if compiled else SDPA
        return T.graph(arch, tiny_models, insert=insert, width=width, height=height, batch_size=batch, decode=False)

    cases = {f"{w}x{h} batch {b}": (prompt(w, h, b, True), prompt(w, h, b, False)) for w, h, b in shapes}
    with caplog.at_level("INFO", logger="diffboost"):
        latents = check_series(comfy_host, cases, outputs_differ=False)
    assert "the latent goes in as 8x8 blocks" in caplog.text, "the compiled model did not take the blocks"
    assert "does not split into 8x8 blocks" not in caplog.text
    for (width, height, batch), latent in zip(shapes, latents, strict=True):
        assert latent.shape == (batch, T.LATENT_CHANNELS[arch], height // 8, width // 8)


def test_benchmark_sampler_reports_no_recompile_at_a_new_resolution(comfy_host, tiny_models, attention):
    insert = [*attention, compile_node("on")]
    first_compile(comfy_host, T.graph("sd15", tiny_models, insert=insert, decode=False))
    prompt = T.graph("sd15", tiny_models, insert=insert, width=104, height=152, decode=False)
    sampler = prompt[T.NODE_IDS["sampler"]]
    sampler["class_type"] = "DiffBoostBenchmarkSampler"
    sampler["inputs"].update(warmup_runs=1, timed_runs=1)
    count = GraphCount()
    result = comfy_host.run_prompt(prompt).check()
    machine = count.for_free_memory()
    stats = result.outputs[T.NODE_IDS["sampler"]]["diffboost_stats"][0]
    assert stats["model_state"].startswith("compiled: inductor")
    # The first prompt compiled at 64x64: 104x152 compiles nothing, in any run (but for the machine's
    # free memory read by ComfyUI's CPU attention, which the report then counts too).
    counts = (stats["first_call_graphs"], stats["runs"][0]["dynamo_graphs"], stats["recompiles"],
              stats["recompiles_dynamo"], stats["recompiles_diffboost"])
    if machine:
        assert stats["first_call_graphs"] + stats["recompiles"] <= machine, (counts, machine)
    else:
        assert counts == (0, 0, 0, 0, 0), counts
    assert comfy_host.captured_latent().shape == (1, 4, 19, 13)


# ------------------------------------------------------------------------------ model loaded again

def test_the_same_checkpoint_loaded_again_compiles_nothing(comfy_host, tiny_models, attention):
    """ComfyUI drops a model when a prompt without it runs or its cache is cleared; loading the checkpoint
    again builds a new diffusion model of the same layout, which the graphs already built serve."""
    prompt = T.graph("sd15", tiny_models, insert=[*attention, compile_node()], decode=False)
    first = first_compile(comfy_host, prompt)
    count = GraphCount()
    result = comfy_host.run_prompt(prompt, fresh=True).check()  # a new executor: nothing cached
    assert T.NODE_IDS["loader"] in result.executed_nodes, "the checkpoint was not loaded again"
    new_graphs = count.new_graphs()
    assert new_graphs == 0, f"{new_graphs} graphs compiled for the same model loaded again: {count.why()}"
    assert torch.equal(comfy_host.captured_latent(), first)


# ----------------------------------------------------------------------------------- steps and cfg

def test_steps_and_cfg_change_does_not_recompile(comfy_host, tiny_models, attention):
    def prompt(steps, cfg, compiled):
        insert = [*attention, compile_node()] if compiled else attention
        return T.graph("sd15", tiny_models, insert=insert, steps=steps, cfg=cfg, decode=False)

    settings = [(2, 7.0), (3, 7.0), (3, 4.0)]
    check_series(comfy_host, {f"{n} steps, cfg {c}": (prompt(n, c, True), prompt(n, c, False)) for n, c in settings})


# ------------------------------------------------------------------------------------ prompt length

@pytest.mark.parametrize("dynamic", ["on", "auto"])
def test_prompt_length_change_does_not_recompile(comfy_host, tiny_models, attention, dynamic):
    def prompt(tokens, compiled):
        insert = [*attention, compile_node(dynamic)] if compiled else attention
        return T.graph("sd15", tiny_models, insert=insert, tokens=tokens, decode=False)

    check_series(comfy_host, {f"{n} tokens": (prompt(n, True), prompt(n, False)) for n in TOKEN_COUNTS})


def test_concatenated_conditioning_does_not_recompile(comfy_host, tiny_models, attention):
    """ConditioningConcat (one prompt's tokens after another's, as long prompts are built) doubles the tokens."""
    def prompt(concat, compiled):
        p = T.graph("sd15", tiny_models, insert=[*attention, compile_node()] if compiled else attention,
                    decode=False)
        if concat:
            p["30"] = {"class_type": "DiffBoostTest_RandomConditioning", "inputs": {
                "arch": "sd15", "seed": 9, "tokens": 0, "width": 64, "height": 64, "guidance": 3.5}}
            p["31"] = {"class_type": "ConditioningConcat", "inputs": {
                "conditioning_to": [T.NODE_IDS["positive"], 0], "conditioning_from": ["30", 0]}}
            p[T.NODE_IDS["sampler"]]["inputs"]["positive"] = ["31", 0]
        return p

    check_series(comfy_host, {"one prompt": (prompt(False, True), prompt(False, False)),
                              "two prompts concatenated": (prompt(True, True), prompt(True, False))})


# --------------------------------------------------------------------------------------------- LoRA

@pytest.fixture(scope="module")
def second_lora(tiny_models) -> str:
    """A second LoRA file for the tiny SD1.5: the harness' LoRA layout with another seed."""
    from safetensors.torch import save_file

    path = tiny_models.root / "loras" / "diffboost_tiny_sd15_lora_b.safetensors"
    if not path.exists():
        save_file(T._sd15_lora(seed=101), str(path))
    return path.name


def test_switching_lora_or_its_strength_does_not_recompile(comfy_host, tiny_models, attention, second_lora):
    lora = tiny_models.filename("sd15_lora")

    def prompt(filename, strength, compiled):
        insert = [*attention, compile_node()] if compiled else attention
        return T.graph("sd15", tiny_models, insert=[*insert, lora_node(filename, strength)], decode=False)

    settings = [(lora, 1.0), (lora, 0.5), (lora, 0.0), (second_lora, 1.0)]
    check_series(comfy_host, {f"{f} at {s}": (prompt(f, s, True), prompt(f, s, False)) for f, s in settings})


def test_compile_model_rerun_by_an_upstream_lora_change_reuses_its_graphs(comfy_host, tiny_models, attention):
    """LoRA before Compile Model, the usual order: a new strength runs Compile Model again (its input
    changed) on the same diffusion model, and it finds the graphs its earlier run built."""
    def prompt(strength, compiled):
        insert = [*attention, compile_node()] if compiled else attention
        return T.graph("sd15", tiny_models, insert=insert, lora=strength, decode=False)

    check_series(comfy_host, {f"LoRA at {s}, then Compile Model": (prompt(s, True), prompt(s, False))
                              for s in (1.0, 0.5, 0.0)})


def test_frozen_compile_is_rebuilt_for_an_upstream_lora_change(comfy_host, tiny_models):
    """With freezing the weights are constants of the graphs: a new LoRA needs new graphs, not the old ones."""

    def prompt(strength, compiled):
        insert = [*SDPA, compile_node(mode="O2:freezing")] if compiled else SDPA
        return T.graph("sd15", tiny_models, insert=insert, lora=strength, decode=False)

    first = first_compile(comfy_host, prompt(1.0, True))
    graphs, second = sample_counting(comfy_host, prompt(0.0, True))
    assert graphs > 0, "a frozen compile served a new LoRA strength without compiling again"
    assert_changed(second, first, "LoRA 1.0 -> 0.0")
    assert rel_err(second, sample(comfy_host, prompt(0.0, False))) < TOLERANCE


# ---------------------------------------------------------------------------------------- ControlNet

@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_controlnet_strength_and_on_off_do_not_recompile(comfy_host, tiny_models, attention, arch):
    def prompt(strength, compiled):
        insert = [*attention, compile_node()] if compiled else attention
        return T.graph(arch, tiny_models, insert=insert, controlnet=strength, decode=False)

    series = [("ControlNet 1.0", 1.0), ("ControlNet 0.5", 0.5), ("no ControlNet", None),
              ("ControlNet 1.0 again", 1.0), ("no ControlNet again", None), ("ControlNet 0.25", 0.25)]
    # Without a ControlNet the denoiser adds no residuals: other code, compiled once; then switching is free.
    check_series(comfy_host, {label: (prompt(s, True), prompt(s, False)) for label, s in series},
                 new_variants=("no ControlNet",))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_controlnet_with_a_dynamic_compile_follows_the_resolution_without_recompiling(comfy_host, tiny_models,
                                                                                     caplog, arch):
    """The ControlNet's residuals are sized like the latent: with the latent in blocks, their sizes must
    follow the blocks' symbols, not start a graph per resolution."""

    def prompt(size, strength, compiled):
        insert = [*SDPA, compile_node("on")] if compiled else SDPA
        return T.graph(arch, tiny_models, insert=insert, controlnet=strength, width=size[0], height=size[1],
                       decode=False)

    series = list(zip(BLOCK_SIZES, (1.0, 0.5, 1.0, 0.25), strict=True))
    with caplog.at_level("INFO", logger="diffboost"):
        check_series(comfy_host, {f"{w}x{h}, ControlNet {s}": (prompt((w, h), s, True), prompt((w, h), s, False))
                                  for (w, h), s in series}, outputs_differ=False)
    assert "the latent goes in as 8x8 blocks" in caplog.text and "does not split" not in caplog.text


# ----------------------------------------------------------------------------------- attention patch

def test_attention_patch_scale_change_does_not_recompile(comfy_host, tiny_models, attention):
    def prompt(scale, compiled):
        patch = [{"class_type": "DiffBoostTest_AttentionScalePatch", "inputs": {"scale": scale}}]
        insert = [*attention, compile_node()] if compiled else attention
        return T.graph("sd15", tiny_models, insert=[*insert, *(patch if scale is not None else [])], decode=False)

    series = [("no patch", None), ("patch at 0.5", 0.5), ("patch at 1.0", 1.0), ("patch at -0.5", -0.5),
              ("no patch again", None)]
    # The patch added after the compile is other code: compiled once, and it must show in the output.
    check_series(comfy_host, {label: (prompt(s, True), prompt(s, False)) for label, s in series},
                 new_variants=("patch at 0.5",))


# --------------------------------------------------------------------------------- instruct-pix2pix

@pytest.fixture(scope="module")
def ip2p_checkpoint(comfy_host, tiny_models) -> str:
    wf.StandIns(tiny_models.root, tiny_models).path("checkpoints", IP2P_CHECKPOINT)
    return IP2P_CHECKPOINT


def ip2p_prompt(tiny_models, checkpoint: str, insert: list, color: int) -> dict:
    """Tiny instruct-pix2pix: the input image's latent goes in as concat conditioning."""
    p = T.graph("sd15", tiny_models, insert=insert, decode=False)
    p[T.NODE_IDS["loader"]]["inputs"]["ckpt_name"] = checkpoint
    p["40"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}}
    p["41"] = {"class_type": "InstructPixToPixConditioning", "inputs": {
        "positive": [T.NODE_IDS["positive"], 0], "negative": [T.NODE_IDS["negative"], 0],
        "vae": [T.NODE_IDS["loader"], 2], "pixels": ["40", 0]}}
    p[T.NODE_IDS["sampler"]]["inputs"].update(positive=["41", 0], negative=["41", 1], latent_image=["41", 2])
    return p


def test_instruct_pix2pix_new_input_image_does_not_recompile(comfy_host, tiny_models, attention, ip2p_checkpoint):
    def prompt(color, compiled):
        insert = [*attention, compile_node()] if compiled else attention
        return ip2p_prompt(tiny_models, ip2p_checkpoint, insert, color)

    check_series(comfy_host, {f"image #{c:06x}": (prompt(c, True), prompt(c, False)) for c in (0x2060C0, 0xE0A040)})
