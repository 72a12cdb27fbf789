"""Benchmark Sampler (diffboost): KSampler's inputs plus warm-up and timed runs; samples like
KSampler and reports how fast, with what memory and how many recompiles.

`measure_sampling` is the one measuring implementation: the node and `diffboost-bench` both call it."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..measure.flops import FLOPS, gpu_peak_tflops
from ..measure.runner import Reporter, run_benchmark
from ..measure.stats import BenchmarkStats, format_stats
from .patching import compiled_of, describe
from .stats_events import NodeReporter, send_event

NODE_NAME = "Benchmark Sampler (diffboost)"
WRAPPER_KEY = "diffboost.benchmark"
Stats = io.Custom("DIFFBOOST_STATS")  # the stats dict (BenchmarkStats.as_dict), for nodes that read it


class BenchmarkInputError(ValueError):
    """An input the Benchmark Sampler cannot measure; the message names the node and the input."""


def check_inputs(model, latent, warmup: int, runs: int, where: str = NODE_NAME) -> None:
    """Raise BenchmarkInputError, saying what to connect or set instead, for inputs that cannot be measured."""
    if runs is None or runs < 1:
        raise BenchmarkInputError(f"{where}: timed_runs is {runs}; at least 1 timed run is needed to measure "
                                  "anything: set timed_runs to 1 or more (3 gives a median with a spread)")
    if warmup is None or warmup < 0:
        raise BenchmarkInputError(f"{where}: warmup_runs is {warmup}; set it to 0 or more")
    inner = getattr(model, "model", None)
    if not hasattr(model, "clone") or getattr(inner, "diffusion_model", None) is None \
            or not hasattr(inner, "apply_model"):
        raise BenchmarkInputError(
            f"{where}: input 'model' is a {type(model).__name__}, not a diffusion model: connect the MODEL "
            "output of Load Checkpoint, Load Diffusion Model or a node that patches one")
    if not isinstance(latent, dict) or not torch.is_tensor(latent.get("samples")):
        raise BenchmarkInputError(f"{where}: input 'latent_image' has no 'samples' tensor: connect a LATENT "
                                  "such as Empty Latent Image's output")


class _CallRecorder:
    """Wrapper state: starts the step timer when the sampler starts stepping (after model loading and
    conditioning set-up) and keeps one set of denoiser inputs per input shape for FLOP counting."""

    def __init__(self):
        self.timer = None
        self.recording = True  # only the first run's calls are recorded: every run makes the same calls
        self.calls: list = []  # shape key of each call of the first run
        self.inputs: dict = {}  # shape key -> (args, kwargs) of one call

    def sampler_sample(self, executor, *args, **kwargs):
        # Here, not at the first denoiser call: a wrapper that skips calls (step caches) cannot hide the start.
        if self.timer is not None:
            self.timer.start()
        return executor(*args, **kwargs)

    def apply_model(self, executor, *args, **kwargs):
        if self.recording:
            key = _shape_key(args, kwargs)
            self.calls.append(key)
            self.inputs.setdefault(key, (args, kwargs))
        return executor(*args, **kwargs)


def model_state(model) -> str:
    """describe(model), plus ComfyUI's own TorchCompileModel when it is on (describe knows diffboost only)."""
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY

    text = describe(model)
    if model.get_wrappers(WrappersMP.APPLY_MODEL, COMPILE_KEY):
        text = "ComfyUI TorchCompileModel (torch.compile)" + ("" if text.startswith("eager") else f"; {text}")
    return text


def _shape_key(args, kwargs) -> tuple:
    def describe_value(v):
        if torch.is_tensor(v):
            return (tuple(v.shape), str(v.dtype))
        if isinstance(v, (list, tuple)):
            return tuple(describe_value(x) for x in v)
        return None

    # transformer_options (args[5]) changes every step and does not change the work done.
    return tuple(describe_value(a) for a in args[:5]) + tuple(sorted((k, describe_value(v)) for k, v in kwargs.items()))


def measure_sampling(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
                     latent: dict, denoise: float = 1.0, warmup: int = 1, runs: int = 3,
                     reporter: Reporter | None = None, where: str = NODE_NAME,
                     tick_seconds: float = 1.0) -> tuple[dict, BenchmarkStats]:
    """Sample like KSampler (same noise, same conditioning handling) warmup + runs times on a clone
    of `model` and measure every run. Returns (the last run's LATENT, the stats).

    Raises BenchmarkInputError for inputs that cannot be measured; sampling errors propagate."""
    check_inputs(model, latent, warmup, runs, where)
    recorder = _CallRecorder()
    m = model.clone()  # the wrapper below must not reach the caller's model
    m.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, recorder.sampler_sample)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, recorder.apply_model)

    latent_image = comfy.sample.fix_empty_latent_channels(m, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    noise_mask = latent.get("noise_mask")
    device = m.load_device
    peak, peak_source = gpu_peak_tflops(device)
    stats = BenchmarkStats(
        steps=steps, warmup_runs=warmup, timed_runs=runs, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        model_state=model_state(m), peak_tflops=peak, peak_tflops_source=peak_source,
        setup={"model": type(m.model).__name__, "sampler": sampler_name, "scheduler": scheduler, "cfg": cfg,
               "denoise": denoise, "seed": seed, "latent_shape": list(latent_image.shape),
               "dtype": str(m.model.get_dtype())})

    def sample_once(timer, step_done):
        recorder.timer = timer
        try:
            return comfy.sample.sample(
                m, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=denoise, noise_mask=noise_mask, callback=lambda *_: step_done(), disable_pbar=True, seed=seed)
        finally:
            recorder.timer = None
            recorder.recording = False

    def run_flops() -> int | None:
        # Counted on the model's own (uncompiled, unquantized) denoiser: the math, not the implementation.
        per_call = {key: FLOPS.get_or_count(m.model, key, lambda a=args, k=kwargs: m.model._apply_model(*a, **k))
                    for key, (args, kwargs) in recorder.inputs.items()}
        recorder.inputs.clear()  # drop the held tensors
        return sum(per_call[key] for key in recorder.calls) if recorder.calls else None

    def diffboost_graphs() -> int | None:
        compiled = compiled_of(m)
        return compiled.stats.graphs_compiled if compiled is not None else None

    samples = run_benchmark(sample_once, steps=steps, warmup=warmup, runs=runs, stats=stats, device=device,
                            reporter=reporter, diffboost_graph_count=diffboost_graphs, count_run_flops=run_flops,
                            tick_seconds=tick_seconds)
    stats.model_state = model_state(m)  # graph counts and fallbacks are known only now
    out = latent.copy()
    out["samples"] = samples
    return out, stats


class BenchmarkSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiffBoostBenchmarkSampler",
            display_name=NODE_NAME,
            category="diffboost",
            description="Samples like KSampler, several times, and measures each run: it/s from device timing, "
                        "the first call (where compilation happens), peak memory, recompiles and TFLOP/s. "
                        "The figures show on the node and go out as 'diffboost.stats' websocket events.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Int.Input("warmup_runs", default=1, min=0, max=100,
                             tooltip="Untimed runs first; the first of them is where compilation happens."),
                io.Int.Input("timed_runs", default=3, min=1, max=1000,
                             tooltip="Measured runs; figures are their median, with min, max and spread."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The last run's result."),
                io.String.Output(display_name="stats_text", tooltip="The figures as a text table."),
                Stats.Output(display_name="stats",
                             tooltip="Every figure as a JSON-able dict (schema diffboost.stats/1)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, warmup_runs=None, timed_runs=None) -> bool | str:
        # Named arguments (no **kwargs): ComfyUI keeps its own checks for every other input.
        if timed_runs is not None and timed_runs < 1:
            return f"{NODE_NAME}: timed_runs is {timed_runs}; at least 1 timed run is needed: set it to 1 or more"
        if warmup_runs is not None and warmup_runs < 0:
            return f"{NODE_NAME}: warmup_runs is {warmup_runs}; set it to 0 or more"
        return True

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # a benchmark measures again every time it is queued (NaN never equals itself)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                warmup_runs, timed_runs) -> io.NodeOutput:
        node_id = str(cls.hidden.unique_id)
        where = f"{NODE_NAME}, node {node_id}"
        server = _prompt_server()
        check_inputs(model, latent_image, warmup_runs, timed_runs, where)
        reporter = NodeReporter(server, node_id, (warmup_runs + timed_runs) * steps, model_state(model))
        latent, stats = measure_sampling(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                         latent_image, denoise, warmup_runs, timed_runs, reporter, where)
        result = stats.as_dict()
        result["node"] = node_id
        text = format_stats(result)
        send_event(server, node_id, "done", result)
        ui = {"text": [text], "diffboost_stats": [result]}  # kept in /history; the web extension draws it
        return io.NodeOutput(latent, text, result, ui=ui)


def _prompt_server():
    try:
        from server import PromptServer
    except ImportError:  # no server module: ran outside ComfyUI
        return None
    return getattr(PromptServer, "instance", None)
