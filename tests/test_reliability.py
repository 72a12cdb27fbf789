"""Reliability: what the pack does when things go wrong, inside the real ComfyUI (in-process executor
and a real server) with tiny random-weight models on the CPU. docs/guarantees.md states what these
tests show.

Failures come in through the pack's real inputs: bad widget values, a broken settings file, a device
without FP8 matmuls, and compile backends that fail on purpose (tests/helpers/test_nodes/
failing_backends.py registers them in the pack's own backend registry)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import tiny_models as T
from helpers.server import PromptRejected
from helpers.test_nodes.failing_backends import FAILURE_TEXT, SLOW_SECONDS
from hypothesis import given, settings
from hypothesis import strategies as st

from diffboost.backends import ConfigError, parse_mode

REPO = Path(__file__).resolve().parents[1]
INSERTED = str(T.FIRST_INSERTED_ID)  # the node under test: the first node on the MODEL path
LOADER, SAMPLER, CAPTURE = T.NODE_IDS["loader"], T.NODE_IDS["sampler"], T.NODE_IDS["capture"]
SEED = 21
REGISTER_BACKENDS = {"1": {"class_type": "DiffBoostTest_RegisterBackends", "inputs": {}}}
# Compiled fp32 against eager on the CPU: fused kernels reorder float arithmetic (test_compile_node.py).
TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def host(comfy_host):
    # Tiny tensors: a second thread only waits for the shared CPU (see test_quantize_node.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    comfy_host.run_prompt(REGISTER_BACKENDS).check()
    yield comfy_host
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(host) -> torch.Tensor:
    """The eager latent of the shared SD1.5 graph, before anything went wrong."""
    host.run_prompt(eager_graph(host), fresh=True).check()
    return host.captured_latent().clone()


@pytest.fixture(scope="module")
def server(comfy_server):
    comfy_server.run(REGISTER_BACKENDS)  # ComfyUI may load the test nodes before the pack: register now
    return comfy_server


# ------------------------------------------------------------------------------------------ graphs

def compile_model(host, **inputs):
    inputs = {"backend": "inductor", "mode": "O2", "on_failure": "fail", "compile_cache": "off", **inputs}
    return lambda link: host.node("DiffBoostCompileModel", model=link, **inputs)


def quantize_fp8(host, **inputs):
    # 256: the tiny SD1.5's attention and feed-forward layers have 320 features on one side.
    inputs = {"min_features": 256, "min_weights_millions": 0.0, "allow_reference_path": True, **inputs}
    return lambda link: host.node("DiffBoostQuantizeFP8", model=link, **inputs)


def eager_graph(host, seed: int = SEED, **kwargs) -> dict:
    return T.graph("sd15", host.models, seed=seed, decode=False, **kwargs)


def sample(host, prompt) -> torch.Tensor:
    host.clear_captures()
    host.run_prompt(prompt).check()
    return host.captured_latent().clone()


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def assert_unharmed(host, reference: torch.Tensor) -> None:
    """The executor still runs prompts, and the model it has loaded still gives the reference latent."""
    host.run_prompt(eager_graph(host, SEED + 1)).check()  # another prompt first: the sampler must run again
    result = host.run_prompt(eager_graph(host)).check()
    assert SAMPLER in result.executed_nodes and LOADER in result.cached_nodes, result.event_names
    assert torch.equal(host.captured_latent(), reference)


def failure_of(result) -> tuple[str, str]:
    """(the node ComfyUI names, the message) of a prompt that failed validation or execution."""
    assert not result.success, "the prompt should have failed"
    if result.validation_failed:
        assert len(result.node_errors) == 1, result.node_errors
        return next(iter(result.node_errors)), result.error
    return result.error_data["node_id"], result.error_data["exception_message"]


# ------------------------------------------------------------------------------------------ 1. bad input

def write_broken_json(folder: Path) -> str:
    path = folder / "fp8-settings.json"
    path.write_text('{"*.attn1": {"quant_type": "weight_only"}')  # the closing brace is missing
    return str(path)


COMPILE_NODE = f"Compile Model (diffboost), node {INSERTED}"
# case: (node, its inputs (a callable gets a temporary folder), node ComfyUI must name, what the message says)
BAD_INPUTS = {
    "unknown backend": (compile_model, {"backend": "tensorrt"}, INSERTED,
                        ["backend 'tensorrt' is unknown", "choose one of inductor"]),
    "malformed mode": (compile_model, {"mode": "max-optimize::cudagraphs"}, INSERTED,
                       ["empty part between colons", "write flags like"]),
    "unknown mode flag": (compile_model, {"mode": "O2:warp-speed"}, INSERTED,
                          ["unknown part 'warp-speed'", "use one of O2, O3"]),
    "contradictory mode": (compile_model, {"mode": "jit:max-autotune"}, INSERTED,
                           ["contradicts itself", "drop one of them"]),
    "onediff backend absent": (compile_model, {"backend": "nexfort"}, INSERTED,
                               [COMPILE_NODE, "backend 'nexfort' needs the", "Choose backend 'inductor'"]),
    "backend raises when compiling": (compile_model, {"backend": "diffboost-test-broken"}, INSERTED,
                                      [COMPILE_NODE, FAILURE_TEXT, "Set on_failure to 'fall back to eager'"]),
    "backend raises at the first step": (compile_model, {"backend": "diffboost-test-crash"}, SAMPLER,
                                         [f"(from {COMPILE_NODE})", FAILURE_TEXT, "Set on_failure"]),
    "invalid JSON settings file": (quantize_fp8, lambda tmp: {"config_path": write_broken_json(tmp)}, INSERTED,
                                   [f"Quantize FP8 (diffboost), node {INSERTED}", "is not valid JSON",
                                    "line 1, column", "clear config_path"]),
    "FP8 on a device without it": (quantize_fp8, {"allow_reference_path": False}, INSERTED,
                                   [f"Quantize FP8 (diffboost), node {INSERTED}", "no FP8 tensor cores",
                                    "turn on allow_reference_path"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_naming_the_node_and_leaves_the_host_unharmed(host, reference, tmp_path, case):
    node, inputs, node_id, says = BAD_INPUTS[case]
    if case == "onediff backend absent" and host.pack_module("backends.registry").get("nexfort").unavailable_reason() \
            is None:
        pytest.skip("nexfort is installed here")
    inputs = inputs(tmp_path) if callable(inputs) else inputs
    result = host.run_prompt(eager_graph(host, insert=node(host, **inputs)))
    failed_node, message = failure_of(result)
    assert failed_node == node_id, message
    for words in says:
        assert words in message
    assert_unharmed(host, reference)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=":OJ2 -\t\n\x00ximtauo"), st.none(), st.integers(), st.binary()))
def test_any_mode_text_parses_or_raises_config_error_with_a_message(text):
    try:
        mode = parse_mode(text)
    except ConfigError as e:
        assert "mode" in str(e)  # a message naming the setting: never another exception type
        return
    assert parse_mode(mode.text) == mode  # what parsed is stable


def test_server_reports_failures_naming_the_node_and_keeps_serving(server, host):
    def capture_stats(prompt) -> dict:
        run, history = server.run(prompt)
        assert run.success, run.of_type("execution_error")
        cached = [n for d in run.of_type("execution_cached") for n in d["nodes"]]
        assert SAMPLER not in cached and LOADER in cached  # sampled again, on the model loaded before
        return history["outputs"][CAPTURE]["diffboost_test_capture"][0]

    server.run(eager_graph(host, SEED + 2, key="server-load"))  # the loader's output is cached from here on
    before = capture_stats(eager_graph(host, key="server-before"))
    with pytest.raises(PromptRejected) as rejected:
        server.post_prompt(eager_graph(host, insert=compile_model(host, backend="tensorrt")))
    assert list(rejected.value.body["node_errors"]) == [INSERTED]
    assert "backend 'tensorrt' is unknown" in json.dumps(rejected.value.body)

    run, history = server.run(eager_graph(host, insert=compile_model(host, backend="diffboost-test-crash")))
    (error,) = run.of_type("execution_error")
    assert error["node_id"] == SAMPLER and f"(from {COMPILE_NODE})" in error["exception_message"]
    assert FAILURE_TEXT in error["exception_message"] and "on_failure" in error["exception_message"]
    assert history["status"]["status_str"] == "error"

    capture_stats(eager_graph(host, SEED + 1, key="server-other"))  # the sampler must run again
    after = capture_stats(eager_graph(host, key="server-before"))
    assert after == before
    assert server.queue_size() == 0 and server.proc.poll() is None


# ------------------------------------------------------------------------------------------ 2. fallback, interrupt

@pytest.mark.parametrize("backend", ["diffboost-test-broken", "diffboost-test-crash"])
def test_fall_back_to_eager_gives_the_eager_output_and_says_so_on_the_node(host, reference, backend):
    insert = compile_model(host, backend=backend, on_failure="fall back to eager")
    result = host.run_prompt(eager_graph(host, insert=insert)).check()
    assert torch.equal(host.captured_latent(), reference)
    texts = result.outputs[INSERTED]["text"] + [e["text"] for e in result.events_named("progress_text")
                                                 if e["node"] == INSERTED]
    assert any(f"FELL BACK TO EAGER (InjectedCompilerError: {FAILURE_TEXT}" in t for t in texts), texts


def test_compile_model_names_the_regions_cuda_graphs_left_out(host, reference):
    """`cudagraphs` where CUDA graphs cannot run (here: on the CPU): the node says so after the first
    step, with the reason. (A mode no other test compiles: graphs reused from an earlier compile in the
    same process were skipped, and said so, at that compile.)"""
    insert = compile_model(host, mode="cudagraphs:jit:skip-rewrites")
    result = host.run_prompt(eager_graph(host, insert=insert), fresh=True).check()
    assert rel_err(host.captured_latent(), reference) < TOLERANCE  # compiled, kernel by kernel
    texts = [e["text"] for e in result.events_named("progress_text") if e["node"] == INSERTED]
    # One region per graph: ComfyUI's CPU attention breaks the UNet's trace into many.
    assert any(re.search(r"CUDA GRAPHS LEFT OUT [1-9]\d* REGION\(S\) \(the model is not on a CUDA GPU\)", t)
               for t in texts), texts


def test_interrupt_during_a_long_compile_leaves_the_server_healthy_and_the_next_compile_works(server, host):
    ws = server.connect()
    try:
        slow = eager_graph(host, insert=compile_model(host, backend="diffboost-test-slow"), key="server-slow")
        prompt_id = server.post_prompt(slow, ws.client_id)
        wait_until_node_runs(ws, prompt_id, SAMPLER)
        time.sleep(1.0)  # the sampler loads the model, then its first step starts the slow compile
        interrupted_at = time.monotonic()
        server.interrupt(prompt_id)
        run = server.follow_ws(ws, prompt_id, timeout=SLOW_SECONDS)
    finally:
        ws.close()
    assert "execution_interrupted" in run.types and not run.success, run.types
    assert time.monotonic() - interrupted_at < SLOW_SECONDS / 3  # stopped mid-compile, not after it
    assert server.history(prompt_id)["status"]["status_str"] == "error"

    eager_run, eager_history = server.run(eager_graph(host, key="server-eager"))
    assert eager_run.success, eager_run.of_type("execution_error")
    compiled_run, compiled_history = server.run(eager_graph(host, insert=compile_model(host), key="server-compiled"))
    assert compiled_run.success, compiled_run.of_type("execution_error")
    eager = eager_history["outputs"][CAPTURE]["diffboost_test_capture"][0]
    compiled = compiled_history["outputs"][CAPTURE]["diffboost_test_capture"][0]
    assert compiled["finite"] and compiled["std"] == pytest.approx(eager["std"], rel=TOLERANCE)
    assert compiled_history["outputs"][INSERTED]["text"][0].startswith("compiled: inductor (mode=O2), ")
    assert server.queue_size() == 0


def wait_until_node_runs(ws, prompt_id: str, node_id: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = ws.recv()
        if isinstance(frame, bytes):
            continue
        msg = json.loads(frame)
        data = msg.get("data") or {}
        if msg.get("type") == "executing" and data.get("prompt_id") == prompt_id and data.get("node") == node_id:
            return
        assert msg.get("type") not in ("execution_error", "execution_interrupted"), msg
    raise TimeoutError(f"node {node_id} of prompt {prompt_id} did not start within {timeout:.0f}s")


# ------------------------------------------------------------------------------------------ 3. model management

def unload_everything() -> None:
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()
    assert not mm.current_loaded_models


@pytest.mark.parametrize("variant", ["compiled", "quantized, reference path"])
def test_output_is_identical_after_comfyui_unloads_the_model_between_prompts(host, variant):
    insert = compile_model(host) if variant == "compiled" else quantize_fp8(host)
    first = sample(host, eager_graph(host, insert=insert))
    unload_everything()
    sample(host, eager_graph(host, SEED + 1, insert=insert))  # another prompt: the sampler must run again
    unload_everything()
    host.clear_captures()
    result = host.run_prompt(eager_graph(host, insert=insert)).check()
    assert INSERTED in result.cached_nodes and SAMPLER in result.executed_nodes  # the same model, loaded again
    assert torch.equal(host.captured_latent(), first)


def diffusion_model_classes() -> tuple[type, ...]:
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel, OpenAISignatureMMDITWrapper


def count_alive(*classes: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in classes)


def rss_mb() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS shows what is still held
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20


@contextlib.contextmanager
def torch_trace_not_captured():
    """pytest (9+) also captures loggers that do not propagate, and torch's structured-trace logger is
    always at DEBUG: each compile's graphs and generated code would be kept in memory by the test run."""
    trace = logging.getLogger("torch.__trace")
    pytest_handlers = [h for h in trace.handlers if type(h).__module__.startswith("_pytest")]
    for h in pytest_handlers:
        trace.removeHandler(h)
    try:
        yield
    finally:
        for h in pytest_handlers:
            trace.addHandler(h)


CYCLES = 6
RSS_GROWTH_BOUND_MB = 150  # a freed-but-held tiny SD1.5 with its graphs added ~100 MB per cycle before the fix


# Other compile options in each pair of cycles: a model loaded again with the same options reuses its
# graphs (compiles nothing), which would leave the freeing of compiled graphs untested.
CYCLE_OPTIONS = [{"fuse_qkv": False}, {"fuse_qkv": True}, {"memory_format": "channels_last"}]


def load_compile_sample_free(host, arch: str, cycle: int, compiled_module: type) -> tuple:
    insert = compile_model(host, mode="default", **CYCLE_OPTIONS[cycle // 2 % len(CYCLE_OPTIONS)])
    prompt = T.graph(arch, host.models, insert=insert, decode=False, seed=cycle)
    started = time.perf_counter()
    host.run_prompt(prompt, fresh=True).check()  # load -> compile -> sample
    seconds = time.perf_counter() - started
    host.new_executor()  # free: ComfyUI drops its cached node outputs ...
    unload_everything()  # ... and its loaded models
    return cycle, arch, seconds, rss_mb(), count_alive(compiled_module), count_alive(*diffusion_model_classes())


def test_freed_compiled_models_release_their_graphs_and_memory(host):
    compiled_module = host.pack_module("backends.compiled").CompiledModule
    arches = ["sd15", "sd3"]
    rows = []
    # Earlier tests (their fixtures, the executor's cache) may hold models of their own, some freed
    # during the first cycle: only what this test leaves behind counts.
    baseline = count_alive(compiled_module), count_alive(*diffusion_model_classes())
    with torch_trace_not_captured():
        for cycle in range(CYCLES):
            rows.append(load_compile_sample_free(host, arches[cycle % 2], cycle, compiled_module))
    print(f"\nalive before the cycles: {baseline[0]} compiled, {baseline[1]} diffusion models")
    print("cycle arch  seconds  rss_mb  compiled_alive  models_alive")
    for cycle, arch, seconds, rss, compiled, models in rows:
        print(f"{cycle:5d} {arch:5s} {seconds:8.1f} {rss:7.0f} {compiled:15d} {models:13d}")
    # A leak adds one of each per cycle: over six cycles the counts would pass the baseline and grow.
    assert all(compiled <= baseline[0] and models <= baseline[1] for *_, compiled, models in rows), \
        "freed models are still alive"
    assert rows[-1][-1] <= rows[0][-1] and rows[-1][-2] <= rows[0][-2], "models pile up over the cycles"
    warm = rows[1][3]  # both models compiled once by then
    growth = max(r[3] for r in rows[2:]) - warm
    print(f"RSS after both models ran once {warm:.0f} MB, growth over {CYCLES - 2} more cycles {growth:.0f} MB")
    assert growth < RSS_GROWTH_BOUND_MB


# ------------------------------------------------------------------------------------------ 4. isolation

def torch_settings() -> dict:
    import torch._inductor.config

    backends = torch.backends
    return {"dynamo": torch._dynamo.config.get_config_copy(), "inductor": torch._inductor.config.get_config_copy(),
            "switches": (backends.cudnn.benchmark, backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32,
                         backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                         backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                         torch.get_float32_matmul_precision())}


def test_a_compile_with_every_setting_leaves_dynamo_and_inductor_config_as_it_was(host, reference):
    before = torch_settings()
    # Every flag that sets an inductor option or a torch switch (regional only changes what is compiled).
    insert = compile_model(host, mode="max-optimize:max-autotune:freezing:low-precision:benchmark:cache-all",
                           memory_format="channels_last", fuse_qkv=True)
    compiled = sample(host, eager_graph(host, insert=insert))
    assert rel_err(compiled, reference) < TOLERANCE
    after = torch_settings()
    for group in before:
        changed = {k for k in before[group] if before[group][k] != after[group][k]} if group != "switches" \
            else ({"switches"} if before[group] != after[group] else set())
        assert not changed, f"{group} settings changed by a compile: {sorted(changed)}"


def test_benchmark_sampler_leaves_its_input_model_unchanged(host, reference):
    bench = {"class_type": "DiffBoostBenchmarkSampler", "inputs": {
        "model": [LOADER, 0], "seed": SEED, "steps": 2, "cfg": T.DEFAULT_CFG["sd15"], "sampler_name": "euler",
        "scheduler": "simple", "positive": [T.NODE_IDS["positive"], 0], "negative": [T.NODE_IDS["negative"], 0],
        "latent_image": [T.NODE_IDS["latent"], 0], "denoise": 1.0, "warmup_runs": 1, "timed_runs": 1}}
    prompt = eager_graph(host)
    prompt["30"] = bench
    result = host.run_prompt(prompt).check()
    assert "30" in result.executed_nodes and LOADER in result.cached_nodes
    assert_unharmed(host, reference)


# ------------------------------------------------------------------------------------------ 5. load

def test_load_test_script_runs_small_and_passes(tiny_models, tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "load_test.py"), "--prompts", "10", "--timeout", "400",
           "--work-dir", str(tmp_path), "--models-dir", str(tiny_models.root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "0 violations" in done.stdout
