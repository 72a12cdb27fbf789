"""Compile Model (diffboost): MODEL in, compiled MODEL out (a clone; the input keeps working)."""

from __future__ import annotations

from comfy_api.latest import io

from ..backends import ConfigError, DiffBoostError, registry
from ..backends.modes import MODE_CHOICES
from ..backends.options import DYNAMIC_CHOICES, MEMORY_FORMATS, ON_FAILURE, CompileOptions
from .cache_location import CACHE_CHOICES, open_cache
from .errors import node_error
from .patching import describe, with_boost


class CompileModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBoostCompileModel",
            display_name="Compile Model (diffboost)",
            category="diffboost",
            description="Compile the diffusion model (UNet or DiT) so each sampling step runs faster. "
                        "The first sampling run compiles (seconds to minutes); later runs reuse it, and so do "
                        "this model loaded again and other models of the same architecture in this ComfyUI.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("backend", options=registry.names(), default="inductor",
                               tooltip="inductor is built into PyTorch; nexfort and oneflow need onediff."),
                io.String.Input("mode", default="O2",
                                tooltip="A preset (O2 precise, O3 fastest), a torch.compile mode, or "
                                        "flags joined by ':' such as max-optimize:max-autotune:low-precision. "
                                        f"Examples: {', '.join(MODE_CHOICES)}."),
                io.Combo.Input("memory_format", options=list(MEMORY_FORMATS), default="preserve"),
                io.Combo.Input("dynamic", options=list(DYNAMIC_CHOICES), default="auto",
                               tooltip="on: one compile serves every resolution and batch size (image sides "
                                       "multiples of 64 px; other sizes share one more compile); SDXL runs about "
                                       "6% below a static compile, after a first compile about twice as long. "
                                       "auto: static first, dynamic from the first new size. off: each size its "
                                       "own compile."),
                io.Boolean.Input("fuse_qkv", default=False,
                                 tooltip="Run attention's q, k and v projections as one matrix multiply."),
                io.Combo.Input("on_failure", options=list(ON_FAILURE), default=ON_FAILURE[0]),
                io.Combo.Input("compile_cache", options=list(CACHE_CHOICES), default=CACHE_CHOICES[0],
                               tooltip="Keep compiled kernels on disk (ComfyUI/user/diffboost/compile-cache) so "
                                       "the next ComfyUI start skips most of the compile."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, backend=None, mode=None, **kwargs) -> bool | str:
        # Only literal widget values are checked here; linked inputs arrive as None.
        try:
            if backend is not None:
                registry.get(backend)
            if mode is not None:
                from ..backends.modes import parse_mode

                parse_mode(mode)
        except ConfigError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, backend, mode, memory_format, dynamic, fuse_qkv, on_failure,
                compile_cache=CACHE_CHOICES[0]) -> io.NodeOutput:
        where = f"Compile Model (diffboost), node {cls.hidden.unique_id}"
        try:
            options = CompileOptions.from_user(backend, mode, memory_format, dynamic, fuse_qkv, on_failure)
            m = with_boost(model, compile_options=options, compile_cache=open_cache(compile_cache),
                           compile_label=f"{type(model.model).__name__} diffusion model (from {where})",
                           compile_node=cls.hidden.unique_id)
        except DiffBoostError as e:
            raise node_error(where, e) from e
        return io.NodeOutput(m, ui={"text": [describe(m)]})
