"""Session fixtures for tests that need ComfyUI (the host):

- comfy_host: helpers.host.Host, ComfyUI booted in this process with this pack loaded as
  custom_nodes/diffboost; `comfy_host.run_prompt(prompt) -> Result`.
- tiny_models: helpers.tiny_models.TinyModels, tiny real-architecture model files (written on first use).
- comfy_server: helpers.server.ComfyServer, a real headless ComfyUI subprocess, started on first use.

Tests using them are marked `host` and skipped, with a loud summary line, when ComfyUI is absent.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import host as host_helpers

HOST_FIXTURES = {"comfy_path", "comfy_host", "tiny_models", "comfy_server"}
_skipped_host_tests: list[str] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "host: needs a ComfyUI installation (COMFYUI_PATH or $HOME/ComfyUI)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HOST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.host)


def pytest_runtest_logreport(report):
    if report.skipped and "host" in report.keywords and host_helpers.HOST_MISSING_REASON in str(report.longrepr):
        _skipped_host_tests.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _skipped_host_tests:
        terminalreporter.write_line(
            f"!!! {host_helpers.HOST_MISSING_REASON}: {len(_skipped_host_tests)} host tests were SKIPPED !!!",
            red=True, bold=True)


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    path = host_helpers.find_comfyui()
    if path is None:
        pytest.skip(host_helpers.HOST_MISSING_REASON)
    return path


@pytest.fixture(scope="session")
def comfy_host(comfy_path):
    return host_helpers.boot()


@pytest.fixture(scope="session")
def tiny_models(comfy_host):
    # Writing the files builds ComfyUI modules on the meta device, so ComfyUI must be imported first.
    return comfy_host.models


@pytest.fixture(scope="session")
def comfy_server(comfy_path, tiny_models):
    from helpers.server import ComfyServer

    work = Path(tempfile.mkdtemp(prefix="diffboost-server-"))
    server = ComfyServer(comfy_path, work, tiny_models)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)
