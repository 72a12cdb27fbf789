"""The Benchmark Sampler node inside the real ComfyUI host (in-process executor), on a tiny
random-weight SD1.5. Timings are compared with each other, never with absolute speeds."""

from __future__ import annotations

import time

import pytest
import torch

from diffboost.bench.host import ComfyNotFound, boot

STEPS = 3
RES = 64  # 8x8 latent: a step takes tens of milliseconds on a CPU


@pytest.fixture(scope="module")
def host():
    try:
        return boot()
    except ComfyNotFound as e:
        pytest.skip(f"HOST TESTS SKIPPED: {e}")


@pytest.fixture(scope="module")
def tiny(host):
    """The tiny model, and a test-only source node that hands it (and its conditioning) to a graph."""
    from diffboost.bench import models

    bm = models.build("tiny-sd15", host.device, seed=0)

    class TinyModelSource:  # test only: a graph needs a node that outputs the in-memory model
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
        FUNCTION = "load"
        CATEGORY = "testing"

        def load(self):
            return bm.patcher, bm.positive, bm.negative

    host.nodes.NODE_CLASS_MAPPINGS["DiffBoostTestTinyModel"] = TinyModelSource
    return bm


@pytest.fixture
def recording(host, monkeypatch):
    """A fresh PromptServer stand-in for one test: every websocket message it would send."""
    import server

    from diffboost.bench.host import RecordingServer

    rec = RecordingServer()
    rec.client_id = "test-client"
    monkeypatch.setattr(server.PromptServer, "instance", rec)
    return rec


def bench_prompt(model_link=("1", 0), steps=STEPS, warmup=1, runs=2, extra=None) -> dict:
    prompt = {
        "1": {"class_type": "DiffBoostTestTinyModel", "inputs": {}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}},
        "3": {"class_type": "DiffBoostBenchmarkSampler", "inputs": {
            "model": list(model_link), "seed": 7, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["2", 0],
            "denoise": 1.0, "warmup_runs": warmup, "timed_runs": runs}},
    }
    prompt.update(extra or {})
    return prompt


def run(host, prompt) -> dict:
    import execution

    executor = execution.PromptExecutor(host.server, cache_args={"lru": 0, "ram": 0.0})
    import asyncio

    valid = asyncio.run(execution.validate_prompt("p1", prompt, None))
    assert valid[0], valid
    executor.execute(prompt, "p1", {}, valid[2])
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert executor.success, errors
    return executor.history_result["outputs"]


def with_defaults(host, class_type: str, **inputs) -> dict:
    """An API-format node with every widget input not given set to its default (schemas grow)."""
    required = host.nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()["required"]
    for name, spec in required.items():
        if name not in inputs and len(spec) > 1 and "default" in spec[1]:
            inputs[name] = spec[1]["default"]
    return {"class_type": class_type, "inputs": inputs}


def events(rec, phase=None) -> list[dict]:
    return [d for e, d, _ in rec.messages if e == "diffboost.stats" and (phase is None or d["phase"] == phase)]


def test_graph_reports_every_figure_and_the_same_numbers_everywhere(host, tiny, recording):
    outputs = run(host, bench_prompt())
    ui = outputs["3"]
    stats = ui["diffboost_stats"][0]
    assert ui["text"][0].startswith("measure")
    for key in ("it_per_s", "run_s", "step_ms", "first_call_s", "tflops", "tflop_per_step", "recompiles",
                "recompiles_dynamo", "model_state", "spread", "runs"):
        assert stats[key] is not None, key
    assert stats["status"] == "done" and stats["node"] == "3"
    assert stats["timed_runs_done"] == 2 and len(stats["runs"]) == 3
    assert stats["it_per_s"] > 0 and stats["run_s"] > 0 and stats["first_call_s"] > 0 and stats["tflops"] > 0
    assert stats["model_state"].startswith("eager")
    assert stats["peak_mem_bytes"] is None or stats["peak_mem_bytes"] > 0  # None: CPU has no device counter
    assert stats["recompiles"] == 0
    for r in stats["runs"]:
        assert r["steps"] == STEPS and len(r["step_ms"]) == STEPS
        assert r["it_per_s"] * sum(r["step_ms"]) / 1000 == pytest.approx(STEPS, rel=1e-3)
    # End-to-end time holds the steps and a little set-up around them.
    assert STEPS * 0.95 <= stats["it_per_s"] * stats["run_s"] <= STEPS * 4
    # The live events carry the same numbers: the final one is the ui dict itself.
    done = events(recording, "done")
    assert len(done) == 1 and done[0]["stats"] == stats and done[0]["node"] == "3"
    finished = events(recording, "run_finished")
    assert len(finished) == 3 and finished[-1]["stats"]["it_per_s"] == stats["it_per_s"]
    assert [e["kind"] for e in events(recording, "run_started")] == ["first call", "timed", "timed"]
    texts = [d for e, d, _ in recording.messages if e == "progress_text"]
    assert any("first call" in t["text"] for t in texts)


def _timed_denoiser(model, ms: float):
    """A clone whose denoiser call takes `ms` milliseconds of sleep and no compute (it returns its input),
    so step times are set by the test, not by how busy the machine's cores are."""
    from comfy.patcher_extension import WrappersMP

    m = model.clone()

    def denoise(executor, x, *args, **kwargs):
        time.sleep(ms / 1000)
        return x

    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.timed_denoiser", denoise)
    return m


def test_injected_slowdown_moves_the_numbers_the_right_way(host, tiny, recording):
    from diffboost.nodes.benchmark_sampler import measure_sampling
    from diffboost.nodes.stats_events import NodeReporter

    latent = {"samples": torch.zeros(1, 4, RES // 8, RES // 8)}

    def measure(model, reporter=None):
        _, st = measure_sampling(model, 7, STEPS, 7.0, "euler", "simple", tiny.positive, tiny.negative, latent,
                                 warmup=1, runs=3, reporter=reporter, tick_seconds=0.05)
        return st.as_dict()

    fast = measure(_timed_denoiser(tiny.patcher, 20))
    reporter = NodeReporter(recording, "9", 4 * STEPS, "slowed down")
    slow = measure(_timed_denoiser(tiny.patcher, 120), reporter)
    # One denoiser call per step (cond and uncond are batched): 20 ms and 120 ms steps, plus the sampler's
    # own small work (upper bounds are loose: other processes may hold the cores).
    assert 20 <= fast["step_ms"] < 20 + 80 and 120 <= slow["step_ms"] < 120 + 80
    assert slow["it_per_s"] == pytest.approx(1000 / slow["step_ms"], rel=0.1)
    assert slow["it_per_s"] < fast["it_per_s"] * 0.5
    assert slow["run_s"] > fast["run_s"] + STEPS * 0.1 * 0.6  # end-to-end also holds set-up, which varies
    # The stand-in wrapper never reaches the real denoiser, so no FLOPs are claimed for it.
    assert slow["tflop_per_step"] is None and slow["tflops"] is None
    assert events(recording, "first_call"), "no compile-progress event while the first call ran"
    assert tiny.patcher.model_options.get("transformer_options", {}).get("wrappers") in (None, {}), \
        "the benchmark's wrapper leaked into the caller's model"


def test_recompiles_are_reported_for_a_diffboost_compiled_model(host, tiny, recording):
    compile_node = {"4": with_defaults(host, "DiffBoostCompileModel", model=["1", 0], backend="inductor",
                                       mode="default", on_failure="fail")}
    stats = run(host, bench_prompt(model_link=("4", 0), steps=2, warmup=1, runs=1, extra=compile_node))["3"][
        "diffboost_stats"][0]
    assert stats["model_state"].startswith("compiled: inductor")
    assert stats["first_call_graphs"] >= 1  # diffboost's own count of the graphs the first call compiled
    assert stats["recompiles_diffboost"] == 0 and stats["recompiles"] == 0
    assert stats["recompiles_dynamo"] == 0
    assert stats["runs"][0]["diffboost_graphs"] >= 1 and stats["runs"][0]["dynamo_graphs"] >= 1
    assert stats["first_call_s"] > stats["run_s"]


def test_zero_timed_runs_is_rejected_naming_the_node(host, tiny):
    import asyncio

    import execution

    valid = asyncio.run(execution.validate_prompt("p2", bench_prompt(runs=0), None))
    assert not valid[0]
    message = str(valid[3])
    assert "Benchmark Sampler" in message and "timed_runs" in message


def test_a_model_that_is_not_a_diffusion_model_is_rejected_naming_the_node(host, tiny):
    from diffboost.nodes.benchmark_sampler import BenchmarkInputError, measure_sampling

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(BenchmarkInputError, match=r"Benchmark Sampler.*'model' is a object, not a diffusion model"):
        measure_sampling(object(), 0, 2, 7.0, "euler", "simple", tiny.positive, tiny.negative, latent)
    with pytest.raises(BenchmarkInputError, match="latent_image"):
        measure_sampling(tiny.patcher, 0, 2, 7.0, "euler", "simple", tiny.positive, tiny.negative, {"x": 1})
