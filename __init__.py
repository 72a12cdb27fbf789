"""diffboost: a ComfyUI node pack that makes existing graphs faster.

ComfyUI imports this file when the pack sits in custom_nodes/. Importing it is cheap: the nodes
(and through them ComfyUI and torch) load only when ComfyUI asks for `comfy_entrypoint`, so the
engine packages (`diffboost.backends`, ...) import without ComfyUI.
"""

WEB_DIRECTORY = "./web"


def __getattr__(name: str):
    if name == "comfy_entrypoint":
        from .nodes import comfy_entrypoint

        return comfy_entrypoint
    raise AttributeError(name)
