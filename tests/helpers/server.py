"""A real, headless ComfyUI server in a subprocess (CPU, 127.0.0.1 only), with this pack installed as
custom_nodes/diffboost (a symlink to the repository) and the tiny models on its model paths."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .host import REPO, TEST_NODES

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    pass


class PromptRejected(ServerError):
    """POST /prompt answered with an error (validation failed): `.body` is the server's JSON."""

    def __init__(self, status: int, body):
        super().__init__(f"POST /prompt rejected ({status}): {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


@dataclass
class WsRun:
    prompt_id: str
    messages: list = field(default_factory=list)  # every JSON ws message, in order: {"type", "data"}
    binary_frames: int = 0  # preview images etc.

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m.get("type") == kind]

    @property
    def types(self) -> list[str]:
        return [m.get("type") for m in self.messages]

    @property
    def success(self) -> bool:
        return "execution_success" in self.types


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_path: Path, work_dir: Path, models, port: int | None = None,
                 extra_args: list[str] | None = None):
        self.comfy_path = comfy_path
        self.work_dir = work_dir
        self.models = models  # tiny_models.TinyModels
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.log_path = work_dir / "comfyui-server.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 180.0) -> ComfyServer:
        base = self.work_dir / "base"
        custom = base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        for name, target in (("diffboost", REPO), ("diffboost_test_nodes", TEST_NODES)):
            if not (custom / name).exists():
                (custom / name).symlink_to(target, target_is_directory=True)
        models_yaml = self.models.extra_model_paths_yaml(self.work_dir / "extra_model_paths.yaml")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:", "--base-directory", str(base),
               "--extra-model-paths-config", str(models_yaml),
               "--disable-api-nodes",  # no network, and seconds less start-up
               *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("COMFYUI_PATH", None)
        log = open(self.log_path, "wb")
        # Own session: stop() can signal the server and any compile workers it spawned, and nothing else.
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI server did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0):
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # == its process group id (start_new_session)
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(grace)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def import_failures(self) -> list[str]:
        """Custom-node packs the server reported as IMPORT FAILED."""
        return [line for line in self.log_tail(200_000).splitlines() if "IMPORT FAILED" in line]

    # ------------------------------------------------------------------ HTTP
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; the prompt id. Raises PromptRejected with the server's error JSON."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise PromptRejected(e.code, parsed) from None

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stop the running prompt (only if it is `prompt_id`, when given)."""
        body = json.dumps({"prompt_id": prompt_id} if prompt_id else {}).encode()
        req = urllib.request.Request(self.url + "/interrupt", data=body, headers={"Content-Type": "application/json"},
                                     method="POST")
        with urllib.request.urlopen(req, timeout=30):
            pass

    def queue_size(self) -> int:
        """Prompts running or waiting (GET /queue)."""
        queue = self.get_json("/queue")
        return len(queue.get("queue_running", [])) + len(queue.get("queue_pending", []))

    def rss_bytes(self) -> int:
        """The server process's resident memory (its compile worker processes not included)."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def history(self, prompt_id: str) -> dict:
        """GET /history/<id>: that prompt's entry ({"prompt", "outputs", "status", "meta"}) or {}."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def object_info(self, class_type: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{class_type}" if class_type else ""))

    # ------------------------------------------------------------------ websocket
    def connect(self, client_id: str | None = None):
        """An open websocket (websocket-client) for `client_id`; open it before posting the prompt."""
        import websocket

        client_id = client_id or uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://{HOST}:{self.port}/ws?clientId={client_id}", timeout=30)
        ws.client_id = client_id
        return ws

    def follow_ws(self, ws, prompt_id: str, timeout: float = 120.0) -> WsRun:
        """Every message on `ws` until the prompt ends: execution_success/_error/_interrupted, then the
        worker's closing `executing {node: None}` (sent after the history entry is stored)."""
        import websocket

        run = WsRun(prompt_id)
        deadline = time.monotonic() + timeout
        finished = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s; got {run.types[-20:]}\n"
                                   f"{self.log_tail(3000)}")
            ws.settimeout(min(left, 5.0 if finished else left))
            try:
                frame = ws.recv()
            except websocket.WebSocketTimeoutException:
                if finished:  # no closing message: the history entry is written by now anyway
                    return run
                continue
            if isinstance(frame, bytes):
                run.binary_frames += 1
                continue
            msg = json.loads(frame)
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            run.messages.append(msg)
            kind = msg.get("type")
            if kind in ("execution_success", "execution_error", "execution_interrupted"):
                finished = True
            elif finished and kind == "executing" and data.get("node") is None:
                return run

    def run(self, prompt: dict, timeout: float = 120.0) -> tuple[WsRun, dict]:
        """Post `prompt`, follow it on a websocket to the end; (ws messages, /history entry)."""
        ws = self.connect()
        try:
            prompt_id = self.post_prompt(prompt, ws.client_id)
            run = self.follow_ws(ws, prompt_id, timeout)
        finally:
            ws.close()
        return run, self.history(prompt_id)
