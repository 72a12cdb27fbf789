"""The ComfyUI layer: thin node classes over the engine packages.

The node modules (and comfy_api with them) load only when ComfyUI asks for the extension, so
`diffboost.nodes.patching` can be used by scripts without pulling in the whole node API."""


def node_classes() -> list:
    from .benchmark_sampler import BenchmarkSampler
    from .compile_model import CompileModel
    from .quantize_fp8 import QuantizeFP8

    return [CompileModel, BenchmarkSampler, QuantizeFP8]


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class DiffBoostExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return node_classes()

    return DiffBoostExtension()
