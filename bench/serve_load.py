"""Serving throughput and latency: the service under load, next to its baselines, in one run.

    python -m bench.serve_load [--checkpoint weights] [--device auto] [--seconds 10]

1. the service (`python -m app`, a subprocess on 127.0.0.1) with dynamic batching, with 1 and
   (--workers) more processes, and
2. the same service with batching off (max_batch_size=1),
each under closed-loop load at concurrency 1, 8, 32, 64: every client sends a 32x32 JPEG to
POST /predict, waits for the answer, and sends the next. Reports requests/s, p50/p99 latency,
mean batch size (from the server's /metrics) and the server's CPU time per request, in all and on
its event-loop threads (HTTP, multipart, routing, JSON; decoding and the model run elsewhere).
Where the limit sits: "busy" is the share of the measured window each process spent in the
forward pass (from /metrics; near 100%: the model, i.e. the device, is the limit) and on its
event loop's CPU (near 100%: HTTP is); "decode" is the decoding time per request in the worker
threads (from /metrics).

Baseline: the model alone (no HTTP, bench.model_alone) on batches of 1, 8, 32, in the precision
the service serves, timed before every load level and after the last (the server idles
meanwhile): one process on all cores and, for N workers, also N processes at once with the
service's threads each. On shared CPUs the model's speed drifts by up to 2x within minutes, so
each row is compared with the measurements on either side of it, the faster ones: its ratio to
their best images/s, and at concurrency 1 its p50 minus their one-process batch-1 time. The
load generator is a minimal keep-alive HTTP/1.1 client on asyncio (about 0.1 ms of CPU per
request).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import model_alone

BOUNDARY = "benchboundary7d3f"


def jpeg_uploads(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 32x32 JPEGs (smooth colour fields with noise: CIFAR-like sizes)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(base).resize((32, 32), Image.Resampling.BICUBIC)
        noisy = np.clip(
            np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (32, 32, 3)), 0, 255
        )
        buf = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buf, format="JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def http_request(host: str, port: int, jpeg: bytes) -> bytes:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /predict?top_k=1 HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    server_cpu_s: float = float("nan")
    event_loop_cpu_s: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)  # server counters, window deltas

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return float(np.percentile(self.latencies, q)) * 1000


async def _client(host: str, port: int, requests: list[bytes], offset: int, stop_at: float,
                  measure_from: float, result: LoadResult) -> None:  # fmt: skip
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    try:
        while (now := time.perf_counter()) < stop_at:
            start = now
            writer.write(requests[i % len(requests)])
            i += 1
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if start >= measure_from:
                result.latencies.append(time.perf_counter() - start)
                result.statuses[status] = result.statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _load(host: str, port: int, requests: list[bytes], concurrency: int, seconds: float,
                warmup: float, server_pid: int | None = None) -> LoadResult:  # fmt: skip
    begin = time.perf_counter()
    result = LoadResult(concurrency, seconds)
    url = f"http://{host}:{port}"

    async def server_side() -> None:  # the server's CPU time and counters over the window
        await asyncio.sleep(warmup)
        total, loop = _cpu_seconds(server_pid)
        before = await asyncio.to_thread(scrape_metrics, url)
        await asyncio.sleep(seconds)
        total_end, loop_end = _cpu_seconds(server_pid)
        after = await asyncio.to_thread(scrape_metrics, url)
        result.server_cpu_s, result.event_loop_cpu_s = total_end - total, loop_end - loop
        result.metrics = {k: after[k] - before.get(k, 0.0) for k in after}

    await asyncio.gather(*(
        _client(host, port, requests, k, begin + warmup + seconds, begin + warmup, result)
        for k in range(concurrency)
    ), *([server_side()] if server_pid else []))  # fmt: skip
    return result


SCRAPED = (
    "inference_batch_size_sum", "inference_batch_size_count", "inference_batch_seconds_sum",
    "image_decode_seconds_sum",
)  # fmt: skip


def scrape_metrics(url: str) -> dict[str, float]:
    """The server's batch-size and inference-time totals (summed over its processes)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(SCRAPED):
            name, value = line.split()
            values[name] = float(value)
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: argparse.Namespace, precision: str, max_batch_size: int, workers: int
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "app", "--checkpoint", str(args.checkpoint), "--device", args.device,
        "--precision", precision, "--port", str(port), "--max-batch-size", str(max_batch_size),
        "--max-batch-delay-ms", str(args.delay_ms), "--max-queue", "4096", "--workers", str(workers),
        "--log-level", "warning", *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy in 180 s")


def _stat_cpu(stat_path: Path) -> tuple[int, float]:
    """(parent pid, user + system seconds) from a /proc stat file."""
    stat = stat_path.read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of a server: (all threads, event-loop threads), summed over the process and its
    live children (the --workers processes). A process's event loop runs on its main thread."""
    total = loop = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid, cpu = _stat_cpu(entry / "stat")
            if int(entry.name) == pid or ppid == pid:
                total += cpu
                loop += _stat_cpu(entry / "task" / entry.name / "stat")[1]
        except OSError:
            continue  # a process that ended meanwhile
    return total, loop


def _baseline(args: argparse.Namespace, precision: str, threads: int | None, procs: int) -> dict:
    result = model_alone.measure(
        args.checkpoint, args.device, precision, args.model_batches, args.model_seconds,
        threads, procs,
    )  # fmt: skip
    for batch, row in result["batches"].items():
        print(f"model alone, {procs} process(es) x {threads or 'all'} threads, batch {batch}: "
              f"{row['ms']:.2f} ms, {row['images_per_s']:.1f} images/s", file=sys.stderr)  # fmt: skip
    return result


def around_rows(points: list, rows: int) -> list[tuple]:
    """The baseline measurements on either side of each of `rows` load levels: consecutive
    pairs when the model was timed before every level and after the last, else (first, last)."""
    if len(points) == rows + 1:
        return list(itertools.pairwise(points))
    return [(points[0], points[-1])] * rows


def _alone_point(
    args: argparse.Namespace, precision: str, workers: int, threads: int, reuse: dict | None = None
) -> list[dict]:
    """The model alone in one process on all cores and, for several workers, as many processes
    with the service's threads each (that configuration's own ceiling)."""
    point = [reuse or _baseline(args, precision, args.threads, 1)]
    if workers > 1:
        point.append(_baseline(args, precision, threads, workers))
    return point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0]
    )
    model_alone.add_model_arguments(parser)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per load level"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    parser.add_argument("--model-batches", default="1,8,32")
    parser.add_argument("--model-seconds", type=float, default=3.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--delay-ms", type=float, default=2.0, help="max_batch_delay_ms of the server"
    )
    parser.add_argument("--workers", default="1", help="server process counts to try, e.g. 1,2")
    parser.add_argument("--threads", type=int, help="--threads of the server (default: its own)")
    parser.add_argument(
        "--no-unbatched", action="store_true", help="skip the max_batch_size=1 baseline"
    )
    parser.add_argument(
        "--baseline-at", choices=("each-level", "ends"), default="each-level",
        help="time the model alone before every load level, or only before and after each "
        "configuration (a dedicated GPU drifts little, and each timing restarts CUDA)",
    )  # fmt: skip
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    args.model_batches = [int(b) for b in args.model_batches.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    workers_list = [int(w) for w in args.workers.split(",")]
    cpus = os.cpu_count() or 1

    # The precision the service will choose (on a CPU: the faster of fp32 and bf16 at warm-up).
    first = _baseline(args, args.precision, args.threads, 1)
    precision = first["precision"]
    uploads = jpeg_uploads(64)
    configs = [
        (f"service, batching (max {args.max_batch_size}, {args.delay_ms:g} ms)", args.max_batch_size, w)
        for w in workers_list
    ]  # fmt: skip
    if not args.no_unbatched:
        configs.append(("service, batching off (max_batch_size=1)", 1, workers_list[0]))
    rows, baselines = [], []
    for n, (name, max_batch, workers) in enumerate(configs):
        threads = args.threads or max(1, cpus // workers)
        label = name + (f", {workers} processes x {threads} thread(s)" if workers > 1 else "")

        proc, url = start_server(args, precision, max_batch, workers)
        host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        requests = [http_request(host, port, u) for u in uploads]
        # The model alone is timed before every load level and after the last one (the server
        # idles meanwhile); each row is compared with the measurements on either side of it.
        points = [_alone_point(args, precision, workers, threads, first if n == 0 else None)]
        try:
            for c in levels:
                result = asyncio.run(
                    _load(host, port, requests, c, args.seconds, args.warmup, proc.pid)
                )
                m, window = result.metrics, args.seconds * workers

                def per_request_ms(seconds: float, ok: int = result.ok) -> float:
                    return seconds / ok * 1000 if ok else float("nan")

                count = m.get("inference_batch_size_count", 0.0)
                mean_batch = (
                    m.get("inference_batch_size_sum", 0.0) / count if count else float("nan")
                )
                rows.append({
                    # Where the limit sits: the share of the window each process spent in the
                    # forward pass (device transfer included), and on its event loop's CPU.
                    "model_busy": m.get("inference_batch_seconds_sum", float("nan")) / window,
                    "event_loop_busy": result.event_loop_cpu_s / window,
                    "decode_ms": per_request_ms(m.get("image_decode_seconds_sum", float("nan"))),
                    "config": label, "concurrency": c, "rps": result.rps, "p50_ms": result.percentile(50),
                    "p99_ms": result.percentile(99), "mean_batch": mean_batch, "statuses": result.statuses,
                    "server_cpu_ms": per_request_ms(result.server_cpu_s),
                    "event_loop_cpu_ms": per_request_ms(result.event_loop_cpu_s),
                })  # fmt: skip
                print(f"{label}, c={c}: {result.rps:.1f} req/s, p50 {result.percentile(50):.1f} ms, "
                      f"p99 {result.percentile(99):.1f} ms, batch {mean_batch:.1f}, {result.statuses}", file=sys.stderr)  # fmt: skip
                if args.baseline_at == "each-level" or c == levels[-1]:
                    points.append(_alone_point(args, precision, workers, threads))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for row, around in zip(rows[-len(levels) :], around_rows(points, len(levels)), strict=True):
            measured = [m for point in around for m in point]
            row["model_alone_best"] = max(
                r["images_per_s"] for m in measured for r in m["batches"].values()
            )  # the faster side: the harder baseline
            row["model_alone_batch1_ms"] = min(
                (m["batches"][1]["ms"] for m in measured if m["procs"] == 1 and 1 in m["batches"]),
                default=float("nan"),
            )
        baselines.append({"config": label, "points": points})

    device = baselines[0]["points"][0][0]["device"]
    print(f"\ndevice: {device}, precision {precision}, torch {torch.__version__}, {cpus} CPUs\n")
    print("Model alone (no HTTP), timed before each load level and after the last: range over a "
          "configuration's measurements.\n")  # fmt: skip
    print("| next to | processes x threads | "
          + " | ".join(f"batch {b}: ms / images/s" for b in args.model_batches) + " |")  # fmt: skip
    print("| --- | --- |" + " ---: |" * len(args.model_batches))
    for entry in baselines:
        for k in range(len(entry["points"][0])):
            series = [point[k] for point in entry["points"]]
            first_m = series[0]
            cells = []
            for b in args.model_batches:
                ms = [m["batches"][b]["ms"] for m in series]
                ips = [m["batches"][b]["images_per_s"] for m in series]
                cells.append(f"{min(ms):.2f}-{max(ms):.2f} / {min(ips):.1f}-{max(ips):.1f}")
            print(
                f"| {entry['config']} | {first_m['procs']} x {first_m['threads']} | {' | '.join(cells)} |"
            )
    print("\n| configuration | concurrency | requests/s | p50 ms | p99 ms | mean batch | "
          "server CPU ms/request (event loop) | decode ms/request | busy: model / event loop | "
          "vs model alone (best images/s on either side) | p50 - model batch 1 |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        batch = "n/a" if r["mean_batch"] != r["mean_batch"] else f"{r['mean_batch']:.1f}"
        print(f"| {r['config']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{batch} | {r['server_cpu_ms']:.2f} ({r['event_loop_cpu_ms']:.2f}) | {r['decode_ms']:.2f} | "
              f"{r['model_busy'] * 100:.0f}% / {r['event_loop_busy'] * 100:.0f}% | "
              f"{r['rps'] / r['model_alone_best'] * 100:.0f}% ({r['model_alone_best']:.1f}) | "
              + (f"{r['p50_ms'] - r['model_alone_batch1_ms']:+.1f} ms ({r['model_alone_batch1_ms']:.2f}) |"
                 if r["concurrency"] == 1 else " |"))  # fmt: skip
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"device": device, "precision": precision, "baselines": baselines, "rows": rows}, indent=1)
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
