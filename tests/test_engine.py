"""The compile engine on plain torch modules (no ComfyUI): correctness, isolation, fallback."""

from __future__ import annotations

import pytest
import torch
from helpers.compile_caches import without_compile_caches

from diffboost.backends import BackendUnavailable, CompileFailed, CompileOptions, ConfigError, compile_module, registry
from diffboost.backends.base import Backend
from diffboost.backends.fuse import fuse_parallel_linears
from diffboost.backends.modes import parse_mode
from diffboost.backends.runtime import runtime_switches
from diffboost.backends.standin import repeated_blocks, replace_submodules, twin_calling


class Attention(torch.nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v)) + x


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Attention() for _ in range(3)])
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def net():
    torch.manual_seed(0)
    return Net().eval()


def test_fuse_pass_fuses_qkv_and_keeps_the_result():
    model = net()
    x = torch.randn(2, 5, 32)
    gm = torch.fx.symbolic_trace(model)  # plain FX carries no example values: fuse needs shapes
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            node.meta["example_value"] = gm.get_parameter(node.target)
    counted = []

    def backend(g, inputs):
        counted.append(fuse_parallel_linears(g))
        return g.forward

    compiled = torch.compile(model, backend=backend)
    assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert counted == [3]  # one group of three projections per attention block


@pytest.mark.parametrize("mode, fuse", [("default", False), ("default", True), ("regional", False)])
def test_compiled_module_matches_eager_and_leaves_the_original_alone(mode, fuse):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    compiled = compile_module(model, CompileOptions.from_user("inductor", mode, fuse_qkv=fuse))
    x = torch.randn(2, 5, 32)
    assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert compiled.stats.graphs_compiled >= 1 and compiled.stats.failure is None
    # Nothing registered, nothing replaced, nothing changed in the shared module.
    assert list(compiled.parameters()) == [] and [id(p) for p in model.parameters()] == params_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(b) is Attention for b in model.blocks)
    compiled(x)
    assert compiled.stats.calls == 2


def test_weight_changes_after_compile_are_seen_without_recompiling():
    model = net()
    compiled = compile_module(model, CompileOptions.from_user("inductor", "default"))
    x = torch.randn(2, 5, 32)
    compiled(x)
    graphs = compiled.stats.graphs_compiled
    with torch.no_grad():
        model.head.weight.add_(1.0)  # what a LoRA patch does to the real module
    assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert compiled.stats.graphs_compiled == graphs


def test_stand_in_tree_shares_everything_but_what_it_replaced():
    model = net()
    blocks = repeated_blocks(model)
    assert blocks == {Attention}
    seen = []
    twin = replace_submodules(model, lambda n, m: twin_calling(m, lambda x: seen.append(n) or m(x))
                              if type(m) in blocks else None)
    assert twin is not model and twin.head is model.head
    assert all(isinstance(b, Attention) for b in twin.blocks)  # models dispatch on isinstance
    assert twin.blocks[0].to_q is model.blocks[0].to_q
    x = torch.randn(1, 5, 32)
    assert torch.equal(twin(x), model(x)) and seen == ["blocks.0", "blocks.1", "blocks.2"]
    assert type(model.blocks[0]) is Attention  # the original is untouched


class Exploding(Backend):
    name = "exploding"

    def compile(self, module, options, on_graph):
        def run(*args, **kwargs):
            on_graph()
            raise RuntimeError("injected compiler failure")
        return run


def test_failure_falls_back_to_eager_or_fails_as_chosen():
    model = net()
    x = torch.randn(2, 5, 32)
    from diffboost.backends.compiled import CompiledModule

    fallback = CompiledModule(model, CompileOptions.from_user("inductor", "default"), Exploding(), label="test net")
    assert torch.equal(fallback(x), model(x))
    assert "injected compiler failure" in fallback.stats.failure
    strict = CompiledModule(model, CompileOptions.from_user("inductor", "default", on_failure="fail"), Exploding(),
                            label="test net")
    with pytest.raises(CompileFailed, match="inductor could not compile or run the test net: RuntimeError: "
                                            "injected compiler failure.*on_failure"):
        strict(x)


def test_unknown_and_unavailable_backends_fail_before_anything_is_built():
    with pytest.raises(ConfigError, match="backend 'tensorrt' is unknown: choose one of inductor, nexfort, oneflow"):
        compile_module(net(), CompileOptions(backend="tensorrt"))
    for name in ("nexfort", "oneflow"):
        reason = registry.get(name).unavailable_reason()
        if reason is None:
            continue  # installed here: nothing to check
        with pytest.raises(BackendUnavailable, match=f"backend '{name}' needs .*Choose backend 'inductor'"):
            compile_module(net(), CompileOptions(backend=name))


def test_runtime_switches_are_restored_even_on_error():
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch._dynamo.config.recompile_limit)
    with pytest.raises(ValueError):
        with runtime_switches(parse_mode("benchmark:low-precision")):
            assert cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
            raise ValueError
    assert (cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch._dynamo.config.recompile_limit) == before


@pytest.mark.parametrize("mode", ["default", "regional"])
def test_compiling_a_module_again_with_the_same_options_reuses_its_graphs(mode):
    """What Compile Model running again (an upstream LoRA change) does: no graph is built twice, the
    weights of the moment are used, and other options still compile their own graphs."""
    import gc
    import weakref

    torch._dynamo.reset()
    model, x = net(), torch.randn(2, 5, 32)
    options = CompileOptions(mode=parse_mode(mode))
    first = compile_module(model, options)
    with torch.no_grad():
        first(x)
    assert first.stats.graphs_compiled > 0
    del first
    gc.collect()
    with torch.no_grad():
        model.head.weight.mul_(-1)  # a LoRA patched in place
        again = compile_module(model, options)
        assert torch.allclose(again(x), model(x), atol=1e-5)
        assert again.stats.graphs_compiled == 0
        other = compile_module(model, CompileOptions(mode=parse_mode(mode), dynamic="on"))
        other(x)
        assert other.stats.graphs_compiled > 0
        # A new shape still compiles, and counts on the compile that runs it.
        again(torch.randn(3, 7, 32))
        assert again.stats.graphs_compiled > 0
    ref = weakref.ref(model)
    del model, again, other
    gc.collect()
    assert ref() is None, "reusing compiles kept the model alive"


def test_frozen_compile_is_never_reused():
    torch._dynamo.reset()
    model, x = net(), torch.randn(2, 5, 32)
    options = CompileOptions(mode=parse_mode("freezing"))
    with torch.no_grad():
        compile_module(model, options)(x)
        model.head.weight.mul_(-1)
        again = compile_module(model, options)
        assert torch.allclose(again(x), model(x), atol=1e-5)
        assert again.stats.graphs_compiled > 0


def test_a_model_loaded_again_reuses_the_graphs_of_an_earlier_one_of_its_layout():
    """The same checkpoint loaded again (a new module, the same class and layout): no new graph, its own
    weights. Another layout compiles its own."""
    import gc

    torch._dynamo.reset()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        first = compile_module(net(), CompileOptions())
        first(x)
        assert first.stats.graphs_compiled > 0
        del first
        gc.collect()
        reloaded = net()
        reloaded.head.weight.add_(1.0)  # other weights, as another checkpoint of the same model
        again = compile_module(reloaded, CompileOptions())
        assert torch.allclose(again(x), reloaded(x), atol=1e-5)
        assert again.stats.graphs_compiled == 0
        wider = Net()
        wider.head = torch.nn.Linear(32, 16)
        other = compile_module(wider, CompileOptions())
        assert torch.allclose(other(x), wider(x), atol=1e-5)
        assert other.stats.graphs_compiled > 0


def test_regional_compile_traces_each_repeated_block_once():
    torch._dynamo.reset()
    model, x = net(), torch.randn(2, 5, 32)
    with torch.no_grad():
        compiled = compile_module(model, CompileOptions(mode=parse_mode("regional")))
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert compiled.stats.graphs_compiled == 1  # three Attention blocks, one graph


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(),
                                         torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(),
                                         torch.nn.Conv2d(32, 4, 3, padding=1))

    def forward(self, x):
        return self.convs(x)


@pytest.mark.parametrize("memory_format, channels_last_convs", [("preserve", False), ("channels_last", True)])
def test_channels_last_is_kept_by_a_dynamic_compile(monkeypatch, memory_format, channels_last_convs):
    from torch._inductor.graph import GraphLowering

    decided = []
    decide = GraphLowering.decide_layout_opt

    def recording(gm, *, is_inference):  # inductor's own decision, recorded as it is made
        decided.append(decide(gm, is_inference=is_inference))
        return decided[-1]

    monkeypatch.setattr(GraphLowering, "decide_layout_opt", staticmethod(recording))
    torch.manual_seed(0)
    model = ConvNet().eval()
    compiled = compile_module(model, CompileOptions.from_user("inductor", "default", memory_format=memory_format,
                                                              dynamic="on"))
    # Without oneDNN the CPU takes the path a GPU takes: channels-last only where inductor chooses it.
    # No graph from inductor's caches on disk: a cached graph skips the decision this test records.
    with torch.backends.mkldnn.flags(enabled=False), torch.no_grad(), without_compile_caches():
        for size in (16, 24):
            x = torch.randn(1, 4, size, size + 8)
            assert torch.allclose(compiled(x), model(x), atol=1e-4)
    # A symbolic size makes inductor's heuristic decline channels-last; the user's choice overrides it.
    assert decided == [channels_last_convs]
    assert compiled.stats.graphs_compiled == 1


class HandWrittenAttention(torch.nn.Module):
    """Attention written out by hand: inductor's pattern passes rewrite it (into one SDPA call)."""

    def __init__(self, dim=64):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x):
        scores = torch.matmul(self.q(x), self.k(x).transpose(-2, -1)).div(8.0)
        return scores.softmax(dim=-1).matmul(self.v(x))


def test_skip_rewrites_compiles_without_pattern_passes_and_gives_the_same_result():
    from torch._dynamo.utils import counters

    model, x = HandWrittenAttention().eval(), torch.randn(2, 128, 64)
    rewrites = {}
    with torch.no_grad(), without_compile_caches():
        for mode in ("default", "default:skip-rewrites"):
            counters["inductor"].clear()
            out = compile_module(model, CompileOptions.from_user("inductor", mode))(x)
            assert torch.allclose(out, model(x), atol=1e-5)
            rewrites[mode] = counters["inductor"]["pattern_matcher_count"]
    assert rewrites["default"] > 0 and rewrites["default:skip-rewrites"] == 0


def test_quick_schedule_reaches_inductor_and_gives_the_same_result():
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class Look(CustomGraphPass):  # runs inside inductor's compile, where the mode's settings apply
        def __call__(self, graph):
            seen.append((config.loop_ordering_after_fusion, config.triton.autotune_pointwise))

        def uuid(self):
            return "diffboost-test-look"

    model, x = Modulated().eval(), (torch.randn(2, 16, 64), torch.randn(2, 1, 64))
    with torch.no_grad(), without_compile_caches(), config.patch(post_grad_custom_post_pass=Look()):
        for mode in ("default", "default:quick-schedule"):
            out = compile_module(model, CompileOptions.from_user("inductor", mode))(*x)
            assert torch.allclose(out, model(*x), atol=1e-5)
    assert seen == [(True, True), (False, False)]


class Modulated(torch.nn.Module):
    """A DiT block's chain of element-wise work (norm, modulation, GELU, gated residual): what a
    compile fuses into few kernels, and eager rounds to bf16 after every operation."""

    def __init__(self, dim=64):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.up, self.down, self.mod = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim), \
            torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, c):
        shift, scale, gate = self.mod(c).chunk(3, -1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.down(torch.nn.functional.gelu(self.up(h), approximate="tanh"))


class ModulatedStack(torch.nn.Module):
    def __init__(self, depth=12):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Modulated() for _ in range(depth))

    def forward(self, x, c):
        for b in self.blocks:
            x = b(x, c)
        return x


def test_match_eager_rounds_as_eager_does():
    torch.manual_seed(0)
    model = ModulatedStack().to(torch.bfloat16).eval()
    x, c = torch.randn(2, 256, 64, dtype=torch.bfloat16), torch.randn(2, 1, 64, dtype=torch.bfloat16)
    errors = {}
    with torch.no_grad(), without_compile_caches():
        eager = model(x, c).float()
        for mode in ("default", "default:match-eager"):
            out = compile_module(model, CompileOptions.from_user("inductor", mode))(x, c).float()
            errors[mode] = ((out - eager).norm() / eager.norm()).item()
    # Fused kernels keep float32 between operations: 7.5e-3 from eager here; rounding as eager does, 1e-4.
    assert errors["default:match-eager"] < 1e-3 < errors["default"]
