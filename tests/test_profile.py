"""Kernel-time summaries of a profiled run (measure/profile.py): categories, per-step figures and
the device's busy time, from hand-made kernel records and from a real profiled torch run."""

from __future__ import annotations

import torch

from diffboost.measure.profile import OTHER, category, profile_run, summarise


def test_kernel_names_fall_into_the_kind_of_work_they_do():
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert category("nvjet_tst_192x192_64x3_1x2_h_bz_coopA_TNT") == "matmul"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert category("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert category("sm80_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert category("triton_per_fused_add_mul_native_layer_norm_3") == "fused element-wise (compiled)"
    # inductor's kernels carry the names of every op they fused: the norm-and-RoPE kernel in front of
    # an attention, or a convolution's bias add, is element-wise work, not attention or convolution
    assert category("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_addcmul_mul_"
                    ) == "fused element-wise (compiled)"
    assert category("triton_poi_fused_convolution_silu_4") == "fused element-wise (compiled)"
    # its templates are the matmuls, convolutions and attentions they were generated for
    assert category("triton_tem_fused_addmm_gelu_7") == "matmul"
    assert category("triton_tem_fused_convolution_2") == "convolution"
    assert category("triton_tem_fused_flex_attention_0") == "attention"
    assert category("Memcpy DtoD (Device -> Device)") == "copy / cast / fill"
    assert category("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>") == OTHER


def test_summary_gives_per_step_times_and_merges_overlapping_kernels():
    # Two steps; microseconds. Two kernels overlap (streams), a gap of 100 us between steps.
    events = [("ampere_bf16_gemm", 0, 300, 300), ("triton_poi_fused_mul_0", 200, 400, 200),
              ("flash_fwd_kernel", 500, 900, 400), ("ampere_bf16_gemm", 1000, 1300, 300)]
    s = summarise(events, wall_us=1400, steps=2, device="cuda:0")
    assert s.wall_ms == 0.7 and s.busy_ms == (400 + 400 + 300) / 1000 / 2
    assert abs(s.idle_ms - 0.15) < 1e-9
    assert s.by_category == {"matmul": 0.3, "fused element-wise (compiled)": 0.1, "attention": 0.2}
    assert s.kernels["matmul"] == 1.0
    assert s.top[0] == ("ampere_bf16_gemm", "matmul", 0.3, 1.0)
    table = s.table()
    assert "| matmul | 0.30 | 43% | 1 |" in table and "device idle" in table


def test_profiled_cpu_run_counts_the_matmuls_it_ran():
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def run():
        for _ in range(4):
            torch.mm(a, b)

    s = profile_run(run, steps=2, device="cpu")
    assert s.kernels["matmul"] == 2.0  # four multiplies over two steps
    assert 0 < s.by_category["matmul"] <= s.wall_ms and s.busy_ms <= s.wall_ms
    assert s.as_dict()["top_kernels"][0]["name"] == "aten::mm"
