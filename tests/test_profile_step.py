"""bench.profile_step's kernel table: it runs only on a GPU, so its parsing is checked here on
the kernel names a Hopper GPU reports."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bench import profile_step
from bench.profile_step import group_of, kernel_events, kernel_table, short_name

NAMES = {
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": (
        "convolution (cuDNN)"
    ),
    "sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution (cuDNN)",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x128x64_warpgroupsize1x1x1": (
        "matmul (cuBLAS: fc1-fc3)"
    ),
    "nvjet_hsh_64x64_64x16_4x1_v_bz_splitK_TNN": "matmul (cuBLAS: fc1-fc3)",
    "void at::native::batch_norm_collect_statistics_channels_last_kernel<...>": "batch norm",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedSgdMathFunctor>": (
        "SGD update"
    ),
    "void at::native::max_pool_backward_nhwc<c10::BFloat16, float>": "max-pool",
    "void at::native::fused_dropout_kernel_vec<c10::BFloat16, float>": "dropout / RNG",
    "void at::native::elementwise_kernel<128, 4, bfloat16_copy_kernel_cuda>": "casts and copies",
    "void at::native::vectorized_elementwise_kernel<4, launch_clamp_scalar>": "ReLU",
    "void at::native::reduce_kernel<512, 1, ReduceOp<float, ArgMaxOps<float>>>": (
        "loss, softmax, argmax"
    ),
    "void at::native::vectorized_elementwise_kernel<4, addcmul_cuda_kernel>": "other elementwise",
}


def test_kernels_are_grouped_by_what_they_do() -> None:
    for name, group in NAMES.items():
        assert group_of(name) == group, name


def test_the_table_reads_a_chrome_trace_per_step() -> None:
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "sm90_xmma_fprop_implicit_gemm", "dur": 300.0},
            {"ph": "X", "cat": "kernel", "name": "sm90_xmma_fprop_implicit_gemm", "dur": 300.0},
            {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "dur": 100.0},
            {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "dur": 5000.0},  # host side
            {"ph": "i", "cat": "kernel", "name": "marker"},
        ]
    }
    events = kernel_events(json.loads(json.dumps(trace)))
    assert events == [
        ("sm90_xmma_fprop_implicit_gemm", 300.0),
        ("sm90_xmma_fprop_implicit_gemm", 300.0),
        ("Memset (Device)", 100.0),
    ]
    table = kernel_table(events, steps=2)
    assert "kernels: 0.350 ms per step, 2 launches" in table
    assert "convolution (cuDNN)" in table and "0.300" in table and "85.7%" in table
    assert kernel_table([], steps=1) == "  (no kernels recorded)"


def test_a_real_profiler_trace_parses(tmp_path) -> None:
    # A CPU-only trace has no kernels, but it is the format the GPU run reads.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(8).add_(1)
    prof.export_chrome_trace(str(tmp_path / "t.json"))
    assert kernel_events(json.loads((tmp_path / "t.json").read_text())) == []


def test_kernel_names_lose_their_namespaces_in_the_table() -> None:
    name = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedSgdMathFunctor>"
    assert short_name(name) == "multi_tensor_apply_kernel<FusedSgdMathFunctor>"
    assert "multi_tensor_apply_kernel<FusedSgdMathFunctor>" in kernel_table([(name, 10.0)], 1)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--sections", "kernels,stpe"], "unknown section(s) 'stpe'"),
        (["--sections", ","], "name at least one of kernels, step, blocks"),
        (["--batches", "64,2S6"], "'2S6' is not a whole number"),
        (["--batches", "64,0"], "0 must be at least 1"),
    ],
)
def test_a_bad_section_or_batch_is_refused_before_the_gpu_is_used(
    flags: list[str], says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both were parsed inside the loop: a typo failed after the GPU time of the sections
    before it, and an unknown section's message lacked `error:`."""
    ran: list[str] = []
    # A GPU as far as main can tell; any section it starts is recorded instead of run.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(profile_step, "guarded", lambda title, section: ran.append(title))
    monkeypatch.setattr(sys, "argv", ["profile_step", *flags])
    with pytest.raises(SystemExit) as exit_:
        profile_step.main()
    assert exit_.value.code == 2 and ran == []
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]
    assert says in err and "Traceback" not in err
