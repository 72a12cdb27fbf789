"""An in-process, headless ComfyUI host for tests: the real executor, real nodes, this pack loaded
from a `custom_nodes/diffboost` folder like a user's install, and a PromptServer stand-in that
records every websocket message instead of sending it."""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the pack (repository root)
TEST_NODES = Path(__file__).resolve().parent / "test_nodes"
PACK_NAME = "diffboost"
PACK_NODE_ID = "DiffBoostCompileModel"
CLIENT_ID = "diffboost-test"


def comfyui_candidates() -> list[Path]:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / "ComfyUI", REPO.parent.parent]  # default, or the ComfyUI whose custom_nodes holds us


def find_comfyui() -> Path | None:
    for c in comfyui_candidates():
        if (c / "comfy" / "model_detection.py").is_file():
            return c.resolve()
    return None


HOST_MISSING_REASON = ("ComfyUI HOST NOT FOUND at " + " or ".join(map(str, comfyui_candidates()))
                       + ": set COMFYUI_PATH to the folder holding ComfyUI's main.py")


@dataclass
class Event:
    event: str
    data: object
    sid: object = None


class RecordingServer:
    """What execution.py and the pack need of server.PromptServer.instance; keeps every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events: list[Event] = []

    def send_sync(self, event, data, sid=None):
        self.events.append(Event(event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.events.append(Event("progress_text", {"node": node_id, "text": text}, sid))

    def queue_updated(self):
        pass


@dataclass
class Result:
    """One prompt's outcome. Validation failures come back here too (validation_failed=True)."""

    prompt_id: str
    success: bool
    outputs: dict = field(default_factory=dict)  # node id -> ui dict (executor.history_result["outputs"])
    error: str | None = None  # readable: node id, class and exception message, or the validation errors
    error_data: dict | None = None  # the execution_error event, or validate_prompt's error dict
    node_errors: dict = field(default_factory=dict)  # validate_prompt's per-node errors
    validation_failed: bool = False
    events: list[Event] = field(default_factory=list)  # every recorded message sent during this call
    status_messages: list = field(default_factory=list)  # executor.status_messages: (event, data)

    def events_named(self, name: str) -> list:
        return [e.data for e in self.events if e.event == name]

    @property
    def event_names(self) -> list[str]:
        return [e.event for e in self.events]

    @property
    def cached_nodes(self) -> list[str]:
        """The node ids the executor took from its output cache (the execution_cached event)."""
        return [n for d in self.events_named("execution_cached") for n in d["nodes"]]

    @property
    def executed_nodes(self) -> list[str]:
        return [d["node"] for d in self.events_named("executing") if d.get("node") is not None]

    def check(self) -> Result:
        if not self.success:
            raise AssertionError(f"prompt {self.prompt_id} failed: {self.error}")
        return self


class Host:
    """The booted in-process ComfyUI. Use the session fixture `comfy_host`."""

    def __init__(self, comfy_path: Path, work_dir: Path, models):
        import execution
        import folder_paths
        import server

        import nodes

        self.path = comfy_path
        self.work_dir = work_dir
        self.models = models  # tiny_models.TinyModels
        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.server_module = server
        self.server = RecordingServer()
        self.pack_dir: Path | None = None
        self.pack_module_name: str | None = None
        self.pack_nodes: dict = {}
        self.test_nodes: dict = {}
        self.executor = None
        self.new_executor()

    # -------------------------------------------------------------- executor
    def new_executor(self, cache_type=None, cache_args: dict | None = None):
        """A fresh PromptExecutor (empty output cache), kept for later run_prompt calls.
        Default: the CLASSIC cache, as `main.py` with no cache flags uses."""
        cache_type = self.execution.CacheType.CLASSIC if cache_type is None else cache_type
        self.executor = self.execution.PromptExecutor(self.server, cache_type=cache_type,
                                                      cache_args=cache_args or {"lru": 0, "ram": 0.0})
        return self.executor

    def _own_the_globals(self):
        # Other harnesses in this process (diffboost.bench.host) may have replaced these since boot.
        self.server_module.PromptServer.instance = self.server
        self.nodes.NODE_CLASS_MAPPINGS.update(self.pack_nodes)
        self.nodes.NODE_CLASS_MAPPINGS.update(self.test_nodes)

    def validate(self, prompt: dict, prompt_id: str = "validate") -> tuple:
        """execution.validate_prompt (async in v0.8): (valid, error, outputs_to_execute, node_errors)."""
        self._own_the_globals()
        return asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))

    def run_prompt(self, prompt: dict, prompt_id: str | None = None, *, fresh: bool = False,
                   client_id: str | None = CLIENT_ID, extra_data: dict | None = None) -> Result:
        """Validate and execute an API-format prompt as the server's prompt worker does.
        fresh=True: a new executor first (no cached node outputs). client_id=None: no per-client
        messages (executing/executed are only sent to a client), as for a prompt with no client."""
        prompt_id = prompt_id or uuid.uuid4().hex
        if fresh:
            self.new_executor(self.executor.cache_type, self.executor.cache_args)
        start = len(self.server.events)
        valid, error, outputs, node_errors = self.validate(prompt, prompt_id)
        if not valid:
            return Result(prompt_id, False, error=_validation_text(error, node_errors), error_data=error,
                          node_errors=node_errors, validation_failed=True, events=self.server.events[start:])
        extra = dict(extra_data or {})
        if client_id is not None:
            extra.setdefault("client_id", client_id)
        self.server.last_prompt_id = prompt_id
        e = self.executor
        e.execute(prompt, prompt_id, extra, outputs)
        if self.server.client_id is not None:  # what main.py's prompt_worker sends after each prompt
            self.server.send_sync("executing", {"node": None, "prompt_id": prompt_id}, self.server.client_id)
        err = next((d for ev, d in e.status_messages if ev in ("execution_error", "execution_interrupted")), None)
        text = None
        if err is not None:
            text = (f"node {err['node_id']} ({err['node_type']}): {err.get('exception_type', 'interrupted')}: "
                    f"{err.get('exception_message', '')}")
        return Result(prompt_id, e.success and err is None, outputs=dict(e.history_result.get("outputs", {})),
                      error=text, error_data=err, events=self.server.events[start:],
                      status_messages=list(e.status_messages))

    # -------------------------------------------------------------- access
    def captured_latent(self, key: str = "latent"):
        """The LATENT tensor DiffBoostTest_CaptureLatent stored under `key` (KeyError if none)."""
        return self.nodes.NODE_CLASS_MAPPINGS["DiffBoostTest_CaptureLatent"].STORE[key]

    def captured_image(self, key: str = "latent_image"):
        return self.nodes.NODE_CLASS_MAPPINGS["DiffBoostTest_CaptureImage"].STORE[key]

    def clear_captures(self):
        for node in ("DiffBoostTest_CaptureLatent", "DiffBoostTest_CaptureImage"):
            self.nodes.NODE_CLASS_MAPPINGS[node].STORE.clear()

    def pack_module(self, name: str = ""):
        """A module of the pack as ComfyUI loaded it (e.g. "backends.registry"). The nodes run this copy,
        not the pip-installed `diffboost.*` one: their module-level state differs."""
        full = self.pack_module_name + (f".{name}" if name else "")
        if full not in sys.modules:
            importlib.import_module(full)
        return sys.modules[full]

    def node_class(self, class_type: str):
        return self.nodes.NODE_CLASS_MAPPINGS[class_type]

    def node(self, class_type: str, **inputs) -> dict:
        """An API-format node dict with every widget input not given set to its default (or a combo's
        first choice), so tests keep working as a schema grows. Links (model=...) are left to the caller;
        `tiny_models.graph(insert=...)` fills "model"."""
        return node_with_defaults(self.node_class(class_type).INPUT_TYPES(), class_type, **inputs)


def node_with_defaults(spec: dict, class_type: str, **inputs) -> dict:
    """Host.node for a node's input spec from anywhere: INPUT_TYPES() here, or a server's
    /object_info/<class>["input"]."""
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            if name in inputs:
                continue
            opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
            if "default" in opts:
                inputs[name] = opts["default"]
            elif section == "required" and isinstance(s[0], list) and s[0]:
                inputs[name] = s[0][0]
    return {"class_type": class_type, "inputs": inputs}


def _validation_text(error, node_errors) -> str:
    parts = []
    if error:
        parts.append(f"{error.get('message', '')}: {error.get('details', '')}".strip(": "))
    for node_id, ne in (node_errors or {}).items():
        for err in ne.get("errors", []):
            parts.append(f"node {node_id} ({ne.get('class_type')}): {err.get('message', '')}: "
                         f"{err.get('details', '')}")
    return "\n".join(parts)


_host: Host | None = None


def _load_node_pack(nodes, path: Path, must_define: str) -> dict:
    """nodes.load_custom_node(path); raises if it fails (ComfyUI itself only logs a warning)."""
    before = dict(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(path)))
    cls = nodes.NODE_CLASS_MAPPINGS.get(must_define)
    if not ok or cls is None or getattr(cls, "RELATIVE_PYTHON_MODULE", None) != f"custom_nodes.{path.name}":
        raise RuntimeError(f"ComfyUI could not load the node pack at {path} (no {must_define} from it): "
                           "see the warning logged above")
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v}


def import_comfy() -> Path:
    """Put ComfyUI on sys.path and import its model management on the CPU, without letting it parse
    this process's command line (enough to write the tiny models). Its folder; RuntimeError if absent."""
    comfy_path = find_comfyui()
    if comfy_path is None:
        raise RuntimeError(HOST_MISSING_REASON)
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    import comfy.options

    comfy.options.enable_args_parsing(False)  # ComfyUI must not parse pytest's command line
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read once, when comfy.model_management is first imported
    import comfy.model_management

    if not comfy.model_management.cpu_state == comfy.model_management.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before the harness could select the CPU")
    return comfy_path


def boot(models_root: Path | None = None) -> Host:
    """Import ComfyUI into this process (once per process), register the tiny models' folders and load
    this pack (as custom_nodes/diffboost) and the test nodes. Raises RuntimeError if ComfyUI is absent."""
    global _host
    if _host is not None:
        return _host
    comfy_path = import_comfy()
    importlib.import_module("utils.extra_config")  # before `server`: else `utils` resolves to comfy/utils.py
    import server

    recorder_placeholder = RecordingServer()
    server.PromptServer.instance = recorder_placeholder  # nodes and comfy_extras import-time lookups
    import folder_paths

    import nodes

    from . import tiny_models

    work = Path(tempfile.mkdtemp(prefix="diffboost-host-"))
    # The tiny models alone are 1.6 GB: a run that leaves its folder behind fills the disk within days.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    models = tiny_models.TinyModels(models_root or work / "models").ensure()
    for folder, path in models.folder_paths().items():
        folder_paths.add_model_folder_path(folder, str(path), is_default=True)
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    folder_paths.set_input_directory(str(work / "input"))

    level = logging.getLogger().level
    if "EmptySD3LatentImage" not in nodes.NODE_CLASS_MAPPINGS:  # comfy_extras not loaded yet in this process
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    custom = work / "custom_nodes"
    custom.mkdir()
    (custom / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    (custom / "diffboost_test_nodes").symlink_to(TEST_NODES, target_is_directory=True)
    host = Host(comfy_path, work, models)
    server.PromptServer.instance = host.server
    host.pack_dir = custom / PACK_NAME
    host.pack_module_name = str(host.pack_dir).replace(".", "_x_")  # how load_custom_node names it
    host.pack_nodes = _load_node_pack(nodes, host.pack_dir, PACK_NODE_ID)
    host.test_nodes = _load_node_pack(nodes, custom / "diffboost_test_nodes", "DiffBoostTest_CaptureLatent")
    logging.getLogger().setLevel(level)
    _install_progress_hook()
    _host = host
    return host


def _install_progress_hook():
    """Send `progress` messages for comfy.utils.ProgressBar updates, as main.py's hook does for a server."""
    import comfy.model_management
    import comfy.utils
    import server
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        instance = server.PromptServer.instance  # looked up per call: tests may swap the instance
        ctx = get_executing_context()
        prompt_id = prompt_id or (ctx.prompt_id if ctx else None) or instance.last_prompt_id
        node_id = node_id or (ctx.node_id if ctx else None) or instance.last_node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        get_progress_state().update_progress(node_id, value, total, preview_image)
        instance.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                           instance.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)
