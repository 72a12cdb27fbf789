"""The compile mode string: onediff/nexfort's colon-separated flags, the O2/O3 presets, and
torch.compile's own mode names, parsed into one immutable `CompileMode`."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import ConfigError

# Each flag of the seeds' mode strings, with what it means for the user.
FLAGS = {
    "max-autotune": "autotune the matrix-multiply and convolution kernels (slower compile)",
    "max-optimize": "the most aggressive fusion settings (coordinate-descent tuning, 1x1 convs as matmuls)",
    "cudagraphs": "replay the whole denoiser step as one CUDA graph (removes launch overhead)",
    "freezing": "fold the weights into the compiled graph as constants (weights can no longer change)",
    "low-precision": "allow reduced-precision reductions in fp16/bf16 matmuls",
    "benchmark": "let cuDNN pick the fastest convolution algorithm per shape",
    "cache-all": "keep every compiled artifact in the persistent cache",
    "jit": "compile quickly with fewer optimisations",
    "disable-runtime-fusion": "do not fuse kernels at run time (nexfort only)",
    "regional": "compile each repeated block (transformer/residual block) once and reuse it: much shorter compile",
    "multi-kernel": "let inductor write each normalisation (reduction) kernel two ways and keep the faster one at the "
                    "first call (1.5 - 2.8% faster on an H200); compiled anew in every process, never from the cache",
    "skip-rewrites": "skip inductor's pattern-matching graph rewrites: a shorter cold compile (SDXL 121 -> 99 s on "
                     "an H200) at the same speed",
    "quick-schedule": "a shorter cold compile: inductor keeps its first loop order after fusing, skips its tiling "
                      "analysis and picks element-wise kernels' launch settings without timing them (SDXL 118 -> "
                      "100 s on an H200) at the same speed",
    "match-eager": "round to fp16/bf16 after every operation inside fused kernels, as the uncompiled model does, "
                   "so the result matches ComfyUI's own (random-weight DiTs amplify that rounding over the steps)",
    "flash-attn-4": "run long self-attention (2048 tokens or more) with FlashAttention's CuTe kernels (the "
                    "flash-attn-4 package, Hopper or Blackwell GPUs) instead of torch's",
    "gelu-epilogue": "compute the tanh-GELU after a linear layer (the MLPs of SD3, PixArt and Flux) inside cuBLAS's "
                     "matrix multiply instead of in a separate kernel",
    "joint-qkv": "let SD3's prompt and image q/k/v projections write one shared buffer for the joint attention "
                 "instead of copying their outputs together (three copies a block)",
    "one-pass-norms": "compute each normalisation over up to 4096 channels (the DiTs' layer norms, with the residual "
                      "adds and modulation around them) in one pass over memory instead of inductor's two above 1024",
    "fuse-rope": "compute the rotary embedding (RoPE) in the compiled graph, fused with its neighbours, instead of "
                 "calling comfy_kitchen's separate kernel (Flux and other DiTs with RoPE)",
}

# The presets, chosen by measurement on an H100 (benchmarks/RESULTS.md): CUDA graphs are what turn
# ComfyUI's launch-bound UNet step into a GPU-bound one (SDXL 12 -> 29 it/s); max-optimize and
# max-autotune did not finish compiling SDXL within 7 minutes, so no preset includes them (on Flux with
# FP8, max-autotune kept torch's _scaled_mm for every FP8 layer: nothing to gain there either).
# O2 keeps full-precision reductions; O3 also allows reduced-precision ones. fuse-rope made Flux 1.1%
# (bf16) and 1.7% (FP8) faster in one run on an H200 at the same error, and changes nothing elsewhere.
# skip-rewrites cut SDXL's cold first call from 121 to 99 s (PixArt 37.5 -> 31.5 s) on an H200, at the
# same speed and error on SDXL, SD3, PixArt and Flux FP8 (-0.2% to +1.4%). multi-kernel made every
# model 1.5% - 2.8% faster (SDXL, SD3, PixArt, Flux; bf16 and FP8) at the same error on an H200, but
# torch 2.11 fails to load its kernels from the compile cache in a new process (the model then ran
# uncompiled), so it compiles anew in every process and stays opt-in. match-eager costs speed on some
# models (PixArt 0.7%) and is measured on some only, so it stays opt-in. quick-schedule shortened every
# model's cold first call on an H200 (SDXL 118 -> 100 s, Flux's blocks 23 -> 15 s, SD3 44 -> 40 s,
# PixArt 39 -> 38 s) at the same error and -0.2% to +1% speed. flash-attn-4 (SD3 +7.2%, PixArt +8.3%,
# Flux +1.5% on an H200) needs an optional package and a Hopper or Blackwell GPU, so no preset has it.
# gelu-epilogue made SD3 3.4% (4.7% with flash-attn-4), PixArt 3.4% and Flux 0.8% faster on an H200 at
# the same error, with a shorter cold compile; the UNets have no tanh-GELU, so it changes nothing there.
# one-pass-norms made SD3 1.7%, PixArt 2.0% and Flux 1.0% faster on an H200 at the same error and compile
# time; SDXL with it ran at the speed of every earlier O3 (30.4 it/s), only its wider layer norms change.
# joint-qkv made SD3 2.2% (2.5% with flash-attn-4) faster on an H200 at the same error and compile time;
# it rewrites nothing in Flux, PixArt or SDXL, which have no concatenated q/k/v projections.
PRESETS = {
    "O2": ("cudagraphs", "benchmark", "cache-all", "fuse-rope", "skip-rewrites", "quick-schedule", "gelu-epilogue",
           "one-pass-norms", "joint-qkv"),
    "O3": ("cudagraphs", "low-precision", "benchmark", "cache-all", "fuse-rope", "skip-rewrites", "quick-schedule",
           "gelu-epilogue", "one-pass-norms", "joint-qkv"),
}

# torch.compile's own mode names, as the flags they stand for.
TORCH_MODES = {
    "default": (),
    "reduce-overhead": ("cudagraphs",),
    "max-autotune": ("max-autotune", "cudagraphs"),
    "max-autotune-no-cudagraphs": ("max-autotune",),
}

# Pairs of flags that cannot be asked for together.
CONFLICTS = {
    frozenset({"jit", "max-autotune"}): "'jit' asks for a quick compile, 'max-autotune' for a long one",
    frozenset({"jit", "max-optimize"}): "'jit' asks for a quick compile, 'max-optimize' for a long one",
}

MODE_CHOICES = ["O2", "O3", "O3:regional", "O3:match-eager", "O3:flash-attn-4", *TORCH_MODES,
                "max-optimize:max-autotune:low-precision",
                "max-optimize:max-autotune:freezing:benchmark:low-precision:cudagraphs:cache-all"]


@dataclass(frozen=True)
class CompileMode:
    """Which optimisations a compile asks for. Build it with `parse_mode`."""

    max_autotune: bool = False
    max_optimize: bool = False
    cudagraphs: bool = False
    freezing: bool = False
    low_precision: bool = False
    benchmark: bool = False
    cache_all: bool = False
    jit: bool = False
    disable_runtime_fusion: bool = False
    regional: bool = False
    fuse_rope: bool = False
    multi_kernel: bool = False
    match_eager: bool = False
    skip_rewrites: bool = False
    quick_schedule: bool = False
    flash_attn_4: bool = False
    gelu_epilogue: bool = False
    one_pass_norms: bool = False
    joint_qkv: bool = False
    text: str = "default"

    def flags(self) -> list[str]:
        """The flags that are on, in the mode string's spelling."""
        return [f.name.replace("_", "-") for f in fields(self) if f.name != "text" and getattr(self, f.name)]


def parse_mode(text: str) -> CompileMode:
    """Parse a mode string such as ``max-optimize:max-autotune:low-precision``, ``O3`` or
    ``reduce-overhead``. Presets and torch mode names may be combined with flags (``O2:cudagraphs``).

    Raises ConfigError for an empty part, an unknown word or two flags that contradict each other.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("mode is empty: choose a preset such as 'O2' or 'O3', or flags such as "
                          "'max-optimize:max-autotune'")
    text = text.strip()
    # 'max-autotune' is both a seed flag and a torch mode name; the flag (no CUDA graphs) wins, as
    # in the seeds' nexfort configs. torch's meaning is spelled 'max-autotune:cudagraphs'.
    words = text.split(":")
    on: set[str] = set()
    for word in words:
        word = word.strip()
        if not word:
            raise ConfigError(f"mode '{text}' has an empty part between colons: write flags like "
                              "'max-optimize:max-autotune'")
        if word in PRESETS:
            on.update(PRESETS[word])
        elif word in FLAGS:
            on.add(word)
        elif word in TORCH_MODES:
            on.update(TORCH_MODES[word])
        else:
            known = ", ".join([*PRESETS, *FLAGS, *TORCH_MODES])
            raise ConfigError(f"mode '{text}' has an unknown part '{word}': use one of {known}")
    for pair, why in CONFLICTS.items():
        if pair <= on:
            raise ConfigError(f"mode '{text}' contradicts itself: {why}; drop one of them")
    return CompileMode(text=text, **{w.replace("-", "_"): True for w in on})
