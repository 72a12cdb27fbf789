"""Quantize FP8 (diffboost): MODEL in, MODEL out whose large Linear layers multiply in FP8.

The output is a clone; the input MODEL keeps its full-precision weights and stays usable. FP8
weights are made from the model's weights as they are when it runs, so LoRAs loaded before or
after this node are included. They are made again when ComfyUI loads or patches the weights, and
freed when it unloads the model or deletes the last model that uses them (fp8_lifetime.py).
"""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..backends import DiffBoostError
from ..quant import (
    DEFAULT_IGNORE,
    DEFAULT_MIN_FEATURES,
    DEFAULT_MIN_WEIGHTS_MILLIONS,
    LABELS,
    Fp8Quantizer,
    QuantConfig,
    choose_layers,
)
from ..quant.device import choose_kernel
from .errors import node_error
from .fp8_lifetime import add_fp8_callbacks
from .patching import DENOISER, describe, with_boost

KERNEL_WORDS = {"scaled_mm": "FP8 tensor cores (torch._scaled_mm)",
                "reference": "the slow reference path (dequantize, then multiply in the compute dtype)",
                "weight_only": "FP8 weights dequantized to the compute dtype for each multiply"}


class QuantizeFP8(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBoostQuantizeFP8",
            display_name="Quantize FP8 (diffboost)",
            category="diffboost",
            description="Run the large Linear layers of the diffusion model in FP8 (e4m3). Place it before or "
                        "after Compile Model; the input MODEL is left unchanged.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("quant_type", options=list(LABELS.values()), default=LABELS["rowwise"],
                               tooltip="per-row: one scale per weight row and per token, the most accurate FP8 "
                                       "matmul. per-tensor: one scale per tensor. weight-only: FP8 storage, "
                                       "multiplies in bf16/fp16 on any GPU. The first two need FP8 tensor cores "
                                       "(compute capability 8.9+: RTX 40xx, L4, H100, ...)."),
                io.Int.Input("min_features", default=DEFAULT_MIN_FEATURES, min=16, max=65536, step=16,
                             tooltip="Only Linear layers with at least this many input and output features are "
                                     "quantized. Measured on an H100: FP8 pays on the DiTs' 1536+ wide layers "
                                     "(SD3, Flux) and not on narrower ones (PixArt's 1152, the UNets' <= 1280)."),
                io.Float.Input("min_weights_millions", default=DEFAULT_MIN_WEIGHTS_MILLIONS, min=0.0, max=1000.0,
                               step=0.5, tooltip="And only layers with at least this many million weights (in x "
                                                 "out features). 0 turns it off."),
                io.Boolean.Input("keep_first_last", default=True,
                                 tooltip="Keep the input embedding and the final output layer in high precision "
                                         "(first and last Linear; final_layer, proj_out, x_embedder, img_in, out)."),
                io.String.Input("ignore", default=DEFAULT_IGNORE, multiline=True,
                                tooltip="Module names kept in high precision: globs or re:<regex>, separated by "
                                        "commas or lines; a name also covers everything inside it. The default "
                                        "keeps timestep, pooled-text and modulation layers (one row per image) "
                                        "and the layers that see only text tokens (too few rows to pay)."),
                io.String.Input("config_path", default="",
                                tooltip='Optional JSON file of per-submodule settings, e.g. {"single_blocks.*": '
                                        '{"quant_type": "weight_only"}, "double_blocks.0": false}. A matching '
                                        "entry (the last one wins) decides over ignore, keep_first_last and "
                                        "the sizes. Relative paths start at the ComfyUI folder."),
                io.Boolean.Input("allow_reference_path", default=False,
                                 tooltip="Where FP8 tensor cores are missing (CPU, older GPUs), run a slow "
                                         "dequantize-and-multiply path with the same numerics instead of failing. "
                                         "For testing, not for speed."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, quant_type, min_features, keep_first_last, ignore, config_path, allow_reference_path,
                min_weights_millions=DEFAULT_MIN_WEIGHTS_MILLIONS) -> io.NodeOutput:
        where = f"Quantize FP8 (diffboost), node {cls.hidden.unique_id}"
        try:
            config = QuantConfig.from_user(quant_type, min_features, keep_first_last, ignore,
                                           resolve_path(config_path), allow_reference_path, min_weights_millions)
            selection = choose_layers(model.get_model_object(DENOISER), config)
            # Fail now, not at the first sampling step, when the device cannot run the chosen type.
            kernels = {choose_kernel(t, model.load_device, config.allow_reference_path)
                       for t in set(selection.quantized.values())}
            m = with_boost(model, quantizer=Fp8Quantizer(config), quantization=selection.summary())
        except DiffBoostError as e:
            raise node_error(where, e) from e
        add_fp8_callbacks(m)
        lines = [selection.report()]
        lines += [f"On {model.load_device}: {KERNEL_WORDS[k]}." for k in sorted(kernels)]
        lines.append(describe(m))
        return io.NodeOutput(m, ui={"text": ["\n".join(lines)]})


def resolve_path(text: str) -> str:
    """The config path as typed (quotes from a pasted path removed); relative to the ComfyUI folder."""
    text = (text or "").strip().strip('"').strip("'")
    if not text:
        return ""
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else Path(folder_paths.base_path) / path)
