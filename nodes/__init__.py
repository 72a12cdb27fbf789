"""The ComfyUI layer: thin node classes over the engine packages."""

from comfy_api.latest import ComfyExtension, io

from .compile_model import CompileModel


class DiffBoostExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CompileModel]


async def comfy_entrypoint() -> DiffBoostExtension:
    return DiffBoostExtension()
