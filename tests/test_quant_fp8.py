"""The FP8 engine without ComfyUI: numerics, Fp8Linear, layer selection, config checks and the
stand-in that never touches the original model. CPU only: the reference path stands in for
torch._scaled_mm, with the same quantized operands."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffboost.backends import ConfigError
from diffboost.quant import (
    DEFAULT_IGNORE,
    Fp8Linear,
    Fp8Quantizer,
    Fp8Unavailable,
    QuantConfig,
    choose_layers,
    fp8_layers,
    mark_stale,
    quantize_weight,
    quantized_standin,
    release,
)

E4M3_MAX = 448.0


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# --- numerics -------------------------------------------------------------------------------------

def test_weight_scales_are_amax_over_448_per_row_or_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.linspace(0.1, 10, 64)[:, None]
    q, scale = quantize_weight(w, "rowwise")
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.shape == (64, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, w.abs().amax(dim=1, keepdim=True) / E4M3_MAX)
    assert float(q.float().abs().amax()) == E4M3_MAX  # each row's largest value lands on 448

    q, scale = quantize_weight(w, "tensorwise")
    assert scale.shape == () and torch.isclose(scale, w.abs().amax() / E4M3_MAX)

    _, scale = quantize_weight(torch.zeros(16, 16), "rowwise")  # an all-zero row keeps a finite scale
    assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("quant_type, bound", [("rowwise", 0.06), ("tensorwise", 0.06), ("weight_only", 0.04)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_error_on_gaussian_data_is_within_bound(quant_type, bound, dtype):
    # e4m3 keeps 3 mantissa bits: ~2-3% relative error per operand on gaussian data.
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 768).to(dtype)
    x = torch.randn(2, 77, 512, dtype=dtype)
    layer = Fp8Linear(lin, quant_type, allow_reference_path=True)
    out = layer(x)
    assert out.shape == (2, 77, 768) and out.dtype == dtype
    assert layer.kernel == ("weight_only" if quant_type == "weight_only" else "reference")
    assert rel_error(out, lin(x)) < bound


def test_rowwise_activation_scales_beat_per_tensor_when_rows_differ_in_size():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256) * torch.logspace(-5, 1, 64)[:, None]  # token norms over 6 decades
    with torch.no_grad():
        ref = lin(x)
        per_row = (Fp8Linear(lin, "rowwise", True)(x) - ref).norm(dim=1) / ref.norm(dim=1)
        per_tensor = (Fp8Linear(lin, "tensorwise", True)(x) - ref).norm(dim=1) / ref.norm(dim=1)
    assert per_row.max() < 0.1 and per_tensor.max() > 0.5  # the smallest rows drown in one shared scale


def test_fp8_matmul_on_cpu_needs_the_reference_path_but_weight_only_does_not():
    lin = torch.nn.Linear(64, 64)
    with pytest.raises(Fp8Unavailable, match="no FP8 tensor cores.*allow_reference_path"):
        Fp8Linear(lin, "rowwise")(torch.randn(4, 64))
    assert Fp8Linear(lin, "weight_only")(torch.randn(4, 64)).shape == (4, 64)


# --- layer selection and config -------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(dim, 2 * dim))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.gate = torch.nn.Linear(dim, 32)  # too small to gain anything
        self.odd = torch.nn.Linear(dim, 520)  # 520 is not a multiple of 16

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = x * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        return x + a + self.mlp(h) + self.gate(h).mean(-1, keepdim=True) + self.odd(h).mean(-1, keepdim=True)


class TinyDiT(torch.nn.Module):
    """Names as in ComfyUI's DiTs: x_embedder in, blocks with adaLN modulation, final_layer out."""

    def __init__(self, dim=512, depth=2, channels=16):
        super().__init__()
        self.x_embedder = torch.nn.Linear(channels, dim)
        self.t_embedder = torch.nn.Sequential(torch.nn.Linear(256, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(depth))
        self.final_layer = torch.nn.Linear(dim, channels)
        self.dim = dim

    def forward(self, x, t):
        c = self.t_embedder(t)
        h = self.x_embedder(x)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h)


def tiny_dit(dim=512):
    torch.manual_seed(0)
    return TinyDiT(dim).eval()


def inputs(model):
    torch.manual_seed(1)
    return torch.randn(2, 32, 16), torch.randn(2, 256)


def chosen(model, **config) -> set[str]:
    config = {"min_weights_millions": 0, "min_features": TINY_MIN_FEATURES, **config}
    return set(choose_layers(model, QuantConfig.from_user("rowwise", **config)).quantized)


# The tiny DiT is 512 wide, far below the default thresholds made for the real models.
TINY_MIN_FEATURES = 512
BIG = {f"blocks.{i}.{n}" for i in range(2) for n in ("qkv", "mlp.0", "mlp.2")}


def test_default_selection_keeps_edges_conditioning_small_and_odd_layers():
    model = tiny_dit()
    selection = choose_layers(model, QuantConfig.from_user("rowwise", ignore=DEFAULT_IGNORE, min_weights_millions=0,
                                                           min_features=TINY_MIN_FEATURES))
    assert set(selection.quantized) == BIG
    reasons = {c.name: c.reason for c in selection.kept}
    assert reasons["x_embedder"] == reasons["final_layer"] == "first/last layer"
    assert reasons["t_embedder.0"] == reasons["blocks.0.adaLN_modulation.1"] == "ignore list"
    assert reasons["blocks.1.gate"] == "small" and reasons["blocks.0.odd"] == "shape not a multiple of 16"
    # qkv 3, mlp 4 + 4 (x dim^2 each) per block, out of everything Linear in the model.
    big = 2 * 11 * 512 * 512
    total = big + 2 * (2 * 512 * 512 + 512 * 32 + 512 * 520) + 16 * 512 * 2 + 256 * 512 + 512 * 512
    assert selection.weight_share == pytest.approx(big / total)
    report = selection.report()
    assert "Quantized 6 of 16 Linear layers" in report
    assert "Kept 2 (first/last layer): x_embedder, final_layer" in report
    assert selection.summary() == f"W8A8 rowwise, 6/16 Linear layers ({big / total:.0%} of weights)"


def test_threshold_edges_and_ignore_list_change_the_choice():
    model = tiny_dit()
    # Without the default ignore list, the modulation and timestep layers qualify by size.
    assert chosen(model) == BIG | {"blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1", "t_embedder.2"}
    assert chosen(model, ignore="*adaLN*, t_embedder.*, blocks.1") == {"blocks.0.qkv", "blocks.0.mlp.0",
                                                                        "blocks.0.mlp.2"}
    assert chosen(model, ignore=r"re:.*\.mlp\.\d, *adaLN*, t_embedder.*") == {"blocks.0.qkv", "blocks.1.qkv"}
    assert "final_layer" not in chosen(model, keep_first_last=False)  # 16 output features: too small anyway
    assert "t_embedder.0" in chosen(model, min_features=256, keep_first_last=False, ignore="*adaLN*")


def test_by_default_only_layers_big_enough_for_fp8_to_pay_are_chosen():
    # Shapes from the H100 measurements (benchmarks/RESULTS.md); meta tensors: only shapes are read.
    shapes = {"sdxl_ff": (1280, 5120), "pixart_mlp": (1152, 4608), "sd3_attn_out": (1536, 1536),
              "flux_mlp_up": (3072, 12288), "wide_but_few": (4096, 256)}
    model = torch.nn.Module()
    model.stem = torch.nn.Conv2d(4, 8, 1)
    model.blocks = torch.nn.ModuleDict({name: torch.nn.Linear(*s, device="meta") for name, s in shapes.items()})
    model.head = torch.nn.Conv2d(8, 4, 1)
    selection = choose_layers(model, QuantConfig.from_user("rowwise"))
    assert set(selection.quantized) == {"blocks.sd3_attn_out", "blocks.flux_mlp_up"}
    assert ("Kept 3 (smaller than 1536 features): blocks.sdxl_ff, blocks.pixart_mlp, blocks.wide_but_few"
            in selection.report())
    few = choose_layers(model, QuantConfig.from_user("rowwise", min_features=256, min_weights_millions=2))
    assert "Kept 1 (fewer than 2M weights: FP8 would not pay): blocks.wide_but_few" in few.report()
    assert len(choose_layers(model, QuantConfig.from_user("rowwise", min_features=256,
                                                          min_weights_millions=0)).quantized) == 5


def test_by_default_layers_that_see_only_text_tokens_are_kept():
    # Names as in ComfyUI's MMDiT (SD3), Flux, SDXL and PixArt code: text-token layers have few rows.
    names = ["joint_blocks.0.context_block.mlp.fc1", "joint_blocks.0.x_block.mlp.fc1", "context_embedder",
             "double_blocks.0.txt_mlp.0", "double_blocks.0.img_mlp.0", "txt_in",
             "input_blocks.4.1.transformer_blocks.0.attn2.to_k", "input_blocks.4.1.transformer_blocks.0.attn2.to_q",
             "blocks.0.cross_attn.kv_linear", "blocks.0.cross_attn.q_linear"]
    model = torch.nn.Module()
    model.stem = torch.nn.Conv2d(4, 8, 1)
    for name in names:
        parent = model
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.split(".")[-1], torch.nn.Linear(2048, 2048, device="meta"))
    model.head = torch.nn.Conv2d(8, 4, 1)
    chosen_names = set(choose_layers(model, QuantConfig.from_user("rowwise", ignore=DEFAULT_IGNORE)).quantized)
    assert chosen_names == {"joint_blocks.0.x_block.mlp.fc1", "double_blocks.0.img_mlp.0",
                            "input_blocks.4.1.transformer_blocks.0.attn2.to_q", "blocks.0.cross_attn.q_linear"}


def test_config_file_keeps_forces_and_retypes_layers_last_entry_wins(tmp_path):
    path = tmp_path / "fp8.json"
    path.write_text(json.dumps({
        "blocks.*": {"quant_type": "weight_only"},  # also over the ignore list (adaLN_modulation)
        "blocks.1": False,                        # a whole block stays in high precision
        "blocks.1.qkv": {},                       # ... except its qkv, with the node's type
        "blocks.0.gate": True,                    # forced although small
        "blocks.0.odd": True,                     # cannot be forced: not a multiple of 16
        "final_layer": {"quant_type": "fp8 e4m3 per-tensor scales"},
    }))
    model = tiny_dit()
    config = QuantConfig.from_user("rowwise", ignore="*adaLN*", config_path=path, min_weights_millions=0,
                                   min_features=TINY_MIN_FEATURES)
    plan = choose_layers(model, config).quantized
    assert plan == {"blocks.0.adaLN_modulation.1": "weight_only", "blocks.0.qkv": "weight_only",
                    "blocks.0.mlp.0": "weight_only", "blocks.0.mlp.2": "weight_only",
                    "blocks.0.gate": "rowwise", "blocks.1.qkv": "rowwise", "final_layer": "tensorwise",
                    "t_embedder.2": "rowwise"}


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON: .* line 1, column 2"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"blocks.*": "fp8"}', "entry 'blocks.*': the value must be false, true or"),
    ('{"blocks.*": {"type": "rowwise"}}', "unknown setting.*type"),
    ('{"blocks.*": {"quant_type": "int4"}}', "quant_type 'int4' is not a known FP8 quantization type"),
    ('{"re:blocks.(": false}', "not a valid regular expression"),
])
def test_bad_config_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_user("rowwise", config_path=path)


def test_bad_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        QuantConfig.from_user("rowwise", config_path=tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="'fp4' is not a known FP8 quantization type; choose one of"):
        QuantConfig.from_user("fp4")
    with pytest.raises(ConfigError, match="min_features 8 is too small"):
        QuantConfig.from_user("rowwise", min_features=8)
    with pytest.raises(ConfigError, match="min_weights_millions -1 is negative"):
        QuantConfig.from_user("rowwise", min_weights_millions=-1)
    assert QuantConfig.from_user("weight-only").quant_type == "weight_only"
    assert QuantConfig.from_user("fp8 e4m3 per-tensor scales").quant_type == "tensorwise"


# --- the stand-in ---------------------------------------------------------------------------------

def standin_of(model, **config):
    config = QuantConfig.from_user("rowwise", ignore=DEFAULT_IGNORE, allow_reference_path=True,
                                   **{"min_weights_millions": 0, "min_features": TINY_MIN_FEATURES, **config})
    return quantized_standin(model, config)


def test_standin_shares_everything_but_the_quantized_layers_and_leaves_the_original_alone():
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    x, t = inputs(model)
    expected = model(x, t)

    q = standin_of(model)
    assert isinstance(q, TinyDiT) and q is not model
    out = q(x, t)
    assert 0 < rel_error(out, expected) < 0.1

    # The original: same modules, same parameter objects, same values, same output bit for bit.
    assert dict(model.named_modules()) == modules_before
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model(x, t), expected)

    # The stand-in: quantized layers are new, every other leaf is the original object.
    swapped = {name for name, m in q.named_modules() if isinstance(m, Fp8Linear)}
    assert swapped == BIG and len(fp8_layers(q)) == len(BIG)
    for name, m in model.named_modules():
        if name not in swapped and not m._modules:
            assert q.get_submodule(name) is m, name
        if name in swapped:
            assert q.get_submodule(name).source is m
    assert q.blocks is not model.blocks and q.blocks[0].adaLN_modulation is model.blocks[0].adaLN_modulation
    assert copy.deepcopy(q) is q  # ModelPatcher.clone deep-copies model_options: the view must survive it


def test_quantizer_returns_the_original_when_no_layer_qualifies():
    model = tiny_dit()
    assert Fp8Quantizer(QuantConfig.from_user("rowwise", min_features=4096))(model) is model


def test_a_patched_weight_is_quantized_again_at_the_next_call():
    model = tiny_dit()
    x, t = inputs(model)
    q = standin_of(model)
    q(x, t)
    layer = q.blocks[0].qkv
    old_fp8 = layer.weight_fp8
    # What ComfyUI's patch_weight_to_device does for a LoRA: a new Parameter on the original module.
    patched = model.blocks[0].qkv.weight.detach() * 2
    model.blocks[0].qkv.weight = torch.nn.Parameter(patched, requires_grad=False)
    out_patched = model(x, t)
    assert rel_error(q(x, t), out_patched) < 0.1
    assert layer.weight_fp8 is old_fp8  # quantized again into the same buffer (CUDA graphs keep their address)
    torch.testing.assert_close(layer.weight_scale, patched.abs().amax(1, keepdim=True) / E4M3_MAX)

    # In place through torch ops: the version counter tells.
    with torch.no_grad():
        model.blocks[1].mlp[0].weight.mul_(-1)
    assert rel_error(q(x, t), model(x, t)) < 0.1

    # In place behind autograd's back (`.data.copy_`, ComfyUI's inplace_update): only mark_stale tells.
    scale = q.blocks[1].qkv.weight_scale.clone()
    model.blocks[1].qkv.weight.data.copy_(model.blocks[1].qkv.weight.data * 3)
    q(x, t)
    assert torch.equal(q.blocks[1].qkv.weight_scale, scale)
    mark_stale(q)
    q(x, t)
    torch.testing.assert_close(q.blocks[1].qkv.weight_scale, scale * 3)


def test_weight_functions_are_applied_before_quantizing():
    # ComfyUI's low-VRAM mode applies LoRA at run time through module.weight_function.
    lin = torch.nn.Linear(64, 64, bias=True)
    layer = Fp8Linear(lin, "weight_only")
    x = torch.randn(3, 64)
    layer(x)
    lin.weight_function = [lambda w: w * 0]
    lin.bias_function = [lambda b: b + 1]
    bias = lin.bias.detach().clone()
    torch.testing.assert_close(layer(x).detach(), (bias + 1).expand(3, 64))  # a new function list: a new weight
    assert torch.equal(lin.bias, bias)  # the source's own bias is untouched


def test_release_drops_the_fp8_weights_and_the_next_call_rebuilds_them():
    model = tiny_dit()
    x, t = inputs(model)
    q = standin_of(model)
    expected = q(x, t)
    release(q)
    assert all(layer.weight_fp8 is None for layer in fp8_layers(q))
    assert torch.equal(q(x, t), expected)


def test_compiled_standin_matches_eager_and_follows_a_weight_patch_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_dit(dim=256)
    x, t = inputs(model)
    q = standin_of(model, min_features=256)
    counter = CompileCounterWithBackend("aot_eager")  # inductor on CPU is tested through the host
    compiled = torch.compile(q, backend=counter)
    torch.testing.assert_close(compiled(x, t), q(x, t))
    model.blocks[0].qkv.weight = torch.nn.Parameter(model.blocks[0].qkv.weight.detach() * 2, requires_grad=False)
    torch.testing.assert_close(compiled(x, t), q(x, t))
    assert rel_error(compiled(x, t), model(x, t)) < 0.1
    # The refresh is kept out of the graph (one break at the start); a changed weight costs no recompile.
    assert counter.frame_count == 1, counter.frame_count


def test_regional_compile_of_a_quantized_model_compiles_its_blocks():
    """A block whose Linear layers are all FP8 holds no parameter of its own (the FP8 layers fill their
    buffers at the first call); `regional` must still see it as a block, not silently compile nothing."""
    from diffboost.backends import CompileOptions, compile_module, parse_mode
    from diffboost.quant import Fp8Quantizer

    torch.manual_seed(0)
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    blocks = torch.nn.Sequential(*[Block() for _ in range(3)])
    config = QuantConfig.from_user("rowwise", min_features=16, keep_first_last=False, ignore="",
                                   allow_reference_path=True, min_weights_millions=0.0)
    quantized = Fp8Quantizer(config)(blocks)
    assert len(fp8_layers(quantized)) == 6
    x = torch.randn(4, 32)
    with torch.no_grad():
        eager = quantized(x)
        torch._dynamo.reset()
        compiled = compile_module(quantized, CompileOptions(mode=parse_mode("regional")))
        out = compiled(x)
    assert compiled.stats.graphs_compiled == 1  # three blocks of one layout
    assert rel_error(out, eager) < 1e-2
