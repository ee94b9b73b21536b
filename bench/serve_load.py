"""Serving throughput and latency: the service under load, next to its baselines, in one run.

    python -m bench.serve_load [--checkpoint weights] [--device auto] [--seconds 10]

1. model alone (no HTTP): the predictor's forward pass on batches of 1, 8, 32 (and
   --model-batches), in the precision the service will serve;
2. the service (`python -m app`, a subprocess on 127.0.0.1) with dynamic batching, and
3. the same service with batching off (max_batch_size=1),
each under closed-loop load at concurrency 1, 8, 32, 64: every client sends a 32x32 JPEG to
POST /predict, waits for the answer, and sends the next. Reports requests/s, p50/p99 latency,
mean batch size (from the server's /metrics) and the ratio to the model alone. The load
generator is a minimal keep-alive HTTP/1.1 client on asyncio, so it costs little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.predictor import load_predictor

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
                warmup: float) -> LoadResult:  # fmt: skip
    begin = time.perf_counter()
    result = LoadResult(concurrency, seconds)
    await asyncio.gather(*(
        _client(host, port, requests, k, begin + warmup + seconds, begin + warmup, result)
        for k in range(concurrency)
    ))  # fmt: skip
    return result


def scrape_batches(url: str) -> tuple[float, float]:
    """(sum, count) of the server's inference_batch_size histogram."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("inference_batch_size_sum", "inference_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("inference_batch_size_sum", 0.0), values.get(
        "inference_batch_size_count", 0.0
    )


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


def model_alone(args: argparse.Namespace) -> tuple[str, str, dict[int, tuple[float, float]]]:
    """images/s and ms per batch of the predictor alone; returns (device, precision, rows)."""
    predictor = load_predictor(args.checkpoint, args.device, args.precision)
    predictor.warm_up(
        max(args.model_batches),
        choose_precision=args.precision == "auto" and predictor.device.type == "cpu",
    )
    rows = {}
    for batch in args.model_batches:
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
        predictor.predict(images)
        times = []
        end = time.perf_counter() + args.model_seconds
        while time.perf_counter() < end or len(times) < 5:
            start = time.perf_counter()
            predictor.predict(images)
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1000
        rows[batch] = (batch / (ms / 1000), ms)
        print(
            f"model alone, batch {batch}: {ms:.2f} ms, {rows[batch][0]:.1f} images/s",
            file=sys.stderr,
        )
    device = (
        str(predictor.device)
        if predictor.device.type == "cpu"
        else torch.cuda.get_device_name(predictor.device)
    )
    precision = predictor.precision
    del predictor
    return device, precision, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("weights"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
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
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    args.model_batches = [int(b) for b in args.model_batches.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    workers_list = [int(w) for w in args.workers.split(",")]

    device, precision, alone = model_alone(args)
    uploads = jpeg_uploads(64)
    configs = [
        (
            f"service, batching (max {args.max_batch_size}, {args.delay_ms:g} ms)",
            args.max_batch_size,
            w,
        )
        for w in workers_list
    ]
    if not args.no_unbatched:
        configs.append(("service, batching off (max_batch_size=1)", 1, workers_list[0]))
    rows = []
    for name, max_batch, workers in configs:
        label = name + (f", {workers} processes" if workers > 1 else "")
        proc, url = start_server(args, precision, max_batch, workers)
        host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        requests = [http_request(host, port, u) for u in uploads]
        try:
            for c in levels:
                before = scrape_batches(url)
                result = asyncio.run(_load(host, port, requests, c, args.seconds, args.warmup))
                after = scrape_batches(url)
                count = after[1] - before[1]
                mean_batch = (after[0] - before[0]) / count if count else float("nan")
                rows.append({
                    "config": label, "concurrency": c, "rps": result.rps, "p50_ms": result.percentile(50),
                    "p99_ms": result.percentile(99), "mean_batch": mean_batch, "statuses": result.statuses,
                })  # fmt: skip
                print(f"{label}, c={c}: {result.rps:.1f} req/s, p50 {result.percentile(50):.1f} ms, "
                      f"p99 {result.percentile(99):.1f} ms, batch {mean_batch:.1f}, {result.statuses}", file=sys.stderr)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    # Measured again at the end: on a shared machine the model's own speed drifts; the ratio
    # below uses the faster of the two measurements (the harder baseline).
    _, _, alone_end = model_alone(args)
    best_alone = max(v[0] for v in (*alone.values(), *alone_end.values()))
    print(
        f"\ndevice: {device}, precision {precision}, torch {torch.__version__}, {os.cpu_count()} CPUs\n"
    )
    print("| model alone (no HTTP) | ms per batch (start / end) | images/s (start / end) |")
    print("| --- | ---: | ---: |")
    for batch in alone:
        (ips0, ms0), (ips1, ms1) = alone[batch], alone_end[batch]
        print(f"| batch {batch} | {ms0:.2f} / {ms1:.2f} | {ips0:.1f} / {ips1:.1f} |")
    print(
        "\n| configuration | concurrency | requests/s | p50 ms | p99 ms | mean batch | vs model alone (best) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        batch = "n/a" if r["mean_batch"] != r["mean_batch"] else f"{r['mean_batch']:.1f}"
        print(f"| {r['config']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{batch} | {r['rps'] / best_alone * 100:.0f}% |")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "device": device,
                    "precision": precision,
                    "model_alone": alone,
                    "model_alone_end": alone_end,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
