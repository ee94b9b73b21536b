"""Where a training step's time goes, on random data (kernel times do not depend on pixel
values, and no data set has to be decoded).

    python3 -m bench.profile_step --batches 64,256

For each batch size:
1. each block of the network alone, forward + backward (CUDA events, median of repeats), in the
   training precision, NHWC and NCHW; layer1 as training runs it (space-to-depth) and plain;
2. the whole step as training runs it (`TrainStep`), eager and as a CUDA graph, and that graph
   again with each block's ReLU before its max-pool (the notebook's order) and with
   --early-sgd (the fc head's update overlapping the convolutions' backward) beside it;
3. a kernel table of that CUDA-graph step (torch.profiler): each kernel's time per step, the
   kernels grouped by what they do, and the step's time against the sum of its kernels (the
   difference is the GPU waiting between kernels).
Each section is guarded: a failure is printed and the next one runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import tempfile
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from bench.cli import fail, positive_ints
from bench.train_speed import build_step
from training.data import Split
from training.engine import Precision, TrainStep
from training.model import AlexNet, use_space_to_depth


def time_ms(fn: Callable[[], None], repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(module: nn.Module, x: torch.Tensor, autocast: bool = True) -> Callable[[], None]:
    # Input gradients are needed everywhere but at the image (as in training).
    x = x.detach().requires_grad_(x.shape[1] != 3)

    def run() -> None:
        with torch.autocast(
            x.device.type, dtype=torch.bfloat16, cache_enabled=False, enabled=autocast
        ):
            y = module(x)
        y.float().sum().backward()

    return run


def tf32_matmuls(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    return run


# Kernel name -> what it does; the first pattern that matches wins. Batch norm comes first
# (cuDNN's own has "cudnn" in its name), then convolutions (their names hold "gemm" too), then
# cuBLAS's matmuls ("sm90_xmma_gemm_...", "nvjet_...").
GROUPS: list[tuple[str, str]] = [
    ("batch norm", r"batch_?norm|welford|bn_fw|bn_bw|bn_"),
    ("convolution (cuDNN)", r"conv|fprop|dgrad|wgrad|implicit|cudnn|winograd|fft"),
    ("matmul (cuBLAS: fc1-fc3)", r"gemm|cublas|cutlass|splitk|nvjet|xmma"),
    ("SGD update", r"sgd|multi_tensor|foreach"),
    ("max-pool", r"max_?pool"),
    ("resize (upsample)", r"upsample|interpolat"),
    ("dropout / RNG", r"dropout|bernoulli|philox|curand|randperm|uniform"),
    ("loss, softmax, argmax", r"softmax|nll|cross_entropy|argmax|max_values|log_"),
    ("casts and copies", r"copy|cast|convert|memcpy|memset|nchwtonhwc|nhwctonchw|transpose"),
    ("ReLU", r"threshold|clamp|relu"),
    ("reductions", r"reduce"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "other elementwise"


def short_name(name: str) -> str:
    """A kernel's name without the namespaces that fill the first 90 characters of PyTorch's."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "c10::", "at::"):
        name = name.replace(noise, "")
    return name


def kernel_events(trace: dict) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel, memcpy and memset in a Chrome trace."""
    return [
        (str(e.get("name", "?")), float(e["dur"]))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X"
        and str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")
        and "dur" in e
    ]


def kernel_table(events: Iterable[tuple[str, float]], steps: int, top: int = 25) -> str:
    """Per-step time by kernel and by group, largest first."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, us in events:
        by_name[name].append(us)
    total = sum(sum(v) for v in by_name.values()) / steps / 1000
    if not by_name:
        return "  (no kernels recorded)"
    groups: dict[str, float] = defaultdict(float)
    for name, times in by_name.items():
        groups[group_of(name)] += sum(times) / steps / 1000
    lines = [
        f"  kernels: {total:.3f} ms per step, {sum(map(len, by_name.values())) / steps:.0f} launches"
    ]
    lines.append(f"  {'group':<28} {'ms/step':>8} {'share':>6}")
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {group:<28} {ms:8.3f} {ms / total:6.1%}")
    lines.append(f"  {'kernel (top ' + str(top) + ')':<90} {'ms/step':>8} {'calls':>5} group")
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    for name, times in ranked[:top]:
        short = short_name(name)
        short = short if len(short) <= 90 else short[:87] + "..."
        lines.append(f"  {short:<90} {sum(times) / steps / 1000:8.3f} {len(times) / steps:5.1f} "
                     f"{group_of(name)}")  # fmt: skip
    return "\n".join(lines)


def profiled_kernels(fn: Callable[[], None], steps: int) -> list[tuple[str, float]]:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return kernel_events(json.loads(path.read_text()))


def guarded(title: str, section: Callable[[], None]) -> None:
    try:
        section()
    except Exception:  # one broken section must not cost the rest of a GPU session
        print(f"\n[{title} failed]\n{traceback.format_exc()}", flush=True)


def blocks(batch: int, channels_last: bool, dev: torch.device) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = AlexNet().to(dev, memory_format=fmt)
    x = torch.randn(batch, 3, 227, 227, device=dev, dtype=torch.bfloat16).contiguous(
        memory_format=fmt
    )
    rows = []
    for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
        block = getattr(model, name)
        if name == "layer1":
            rows.append(("layer1, plain 11x11 stride 4", time_ms(fwd_bwd(block, x))))
            use_space_to_depth(block, True)
            label = "layer1, space-to-depth (trained)"
        else:
            label = name
        rows.append((label, time_ms(fwd_bwd(block, x))))
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            x = block(x).contiguous(memory_format=fmt)
    flat = torch.randn(batch, 9216, device=dev, dtype=torch.bfloat16)
    head = nn.Sequential(model.fc1, model.fc2, model.fc3)
    rows.append(("fc1-3", time_ms(fwd_bwd(head, flat))))
    # At batch 64 the head is bound by reading and writing its 54.5 M weights: autocast casts
    # them to bf16 and their gradients back (about 0.55 GB a step); TF32 on the fp32 weights
    # reads them directly. Not in the sum: an alternative, not a part of the step.
    tf32 = tf32_matmuls(fwd_bwd(head, flat.float(), autocast=False))
    rows.append(("fc1-3 alt: fp32 weights, TF32, no cast", time_ms(tf32)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    rows.append(("SGD step (fused)", time_ms(opt.step)))
    total = sum(t for n, t in rows if not n.startswith(("layer1, plain", "fc1-3 alt")))
    layout = "channels_last" if channels_last else "NCHW"
    print(f"\nbatch {batch}, bf16 autocast, {layout}: blocks alone, fwd+bwd, sum {total:.2f} ms")
    for name, t in rows:
        print(f"  {name:<40} {t:7.3f} ms", flush=True)


def make_step(
    batch: int,
    channels_last: bool,
    graph: bool,
    dev: torch.device,
    pool_first: bool = True,
    early_sgd: bool = False,
) -> TrainStep:
    """The step as recipe `seed` (batch 64) or `fast` (above: crop-flip) trains it, with
    cuDNN autotuning on (see build_step)."""
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, device=dev)
    return build_step(
        Split(images, torch.randint(0, 10, (4096,), device=dev)),
        dev,
        batch=batch,
        augment="crop-flip" if batch > 64 else "none",
        precision=Precision(torch.bfloat16, channels_last),
        graph=graph,
        pool_first=pool_first,
        early_sgd=early_sgd,
    )


def whole_step(batch: int, dev: torch.device) -> None:
    print(f"\nbatch {batch}: the whole training step (space-to-depth conv1, as trained)")
    idx = torch.arange(batch, device=dev)
    for channels_last in (True, False):
        for graph in (False, True):
            step = make_step(batch, channels_last, graph, dev)
            ms = time_ms(functools.partial(step, idx))
            print(f"  {'channels_last' if channels_last else 'NCHW':<14} "
                  f"{'CUDA graph' if graph else 'eager':<10} {ms:7.3f} ms", flush=True)  # fmt: skip
    # Side by side: the same step in the notebook's block order (ReLU, then max-pool).
    ms = time_ms(functools.partial(make_step(batch, True, True, dev, pool_first=False), idx))
    print(f"  {'channels_last':<14} {'CUDA graph':<10} {ms:7.3f} ms  ReLU before max-pool "
          "(the notebook's order)", flush=True)  # fmt: skip
    ms = time_ms(functools.partial(make_step(batch, True, True, dev, early_sgd=True), idx))
    print(f"  {'channels_last':<14} {'CUDA graph':<10} {ms:7.3f} ms  --early-sgd (fc1-fc3 "
          "updated on a side stream during the backward)", flush=True)  # fmt: skip


def kernels(batch: int, dev: torch.device, steps: int = 10) -> None:
    """The kernel table of the step as a CUDA graph (if the profiler sees inside graphs), then
    eager: the same kernels, with the CPU's launch gaps between them."""
    idx = torch.arange(batch, device=dev)
    for graph in (True, False):
        run = functools.partial(make_step(batch, True, graph, dev), idx)
        step_ms = time_ms(run)
        events = profiled_kernels(run, steps)
        kind = "CUDA graph" if graph else "eager"
        print(f"\nbatch {batch}: kernels of the {kind} step (channels_last), {step_ms:.3f} ms "
              "per step by CUDA events", flush=True)  # fmt: skip
        print(kernel_table(events, steps))
        if events:
            busy = sum(us for _, us in events) / steps / 1000
            print(f"  the GPU waits between kernels: {step_ms - busy:.3f} ms per step "
                  f"({(step_ms - busy) / step_ms:.1%}), by the two clocks", flush=True)  # fmt: skip


SECTIONS = ("kernels", "step", "blocks")


def section_list(text: str) -> list[str]:
    """`--sections`: a comma list of SECTIONS (argparse `type=`)."""
    sections = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown section(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(SECTIONS)}"
            if unknown
            else f"{text!r}: name at least one of {', '.join(SECTIONS)}"
        )
    return sections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step")
    # Both checked here, before the GPU is touched: they were parsed inside the loop, so a typo
    # failed after the GPU time of the sections before it.
    parser.add_argument("--batches", type=positive_ints, default=[64, 256])
    parser.add_argument("--sections", type=section_list, default=list(SECTIONS),
                        help="which to run, in this order: kernels, step, blocks")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        fail("bench.profile_step times CUDA kernels and needs a GPU; none here")
    torch.backends.cudnn.benchmark = True  # as the seed recipe trains
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}")  # fmt: skip
    for batch in args.batches:
        for section in args.sections:
            if section == "kernels":
                guarded(f"kernels, batch {batch}", functools.partial(kernels, batch, dev))
            elif section == "step":
                guarded(f"whole step, batch {batch}", functools.partial(whole_step, batch, dev))
            else:  # "blocks": section_list admits no other
                for cl in (True, False):
                    guarded(f"blocks, batch {batch}", functools.partial(blocks, batch, cl, dev))


if __name__ == "__main__":
    main()
