"""Serving throughput and latency: the service under load, next to its baselines, in one run.

    python -m bench.serve_load [--checkpoint weights] [--device auto] [--rounds 4] [--seconds 3]

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
the service serves: one process on all cores and, for N workers, also N processes at once with
the service's threads each. On shared CPUs the model's speed drifts by 2x and more within seconds,
so each load level runs in rounds: a few seconds of load, then (the server idle) the model alone,
timed by resident processes loaded once. Each round compares its load window with the timings
taken right after it: requests/s against the images/s of the model's best batch size and process
layout (the one with the highest median over all rounds of the configuration; also against each
round's own fastest, which noise inflates), and at concurrency 1 the p50 against the one-process
batch-1 time. The table gives the median and range of these per-round comparisons. The load generator is a minimal keep-alive
HTTP/1.1 client on asyncio (about 0.1 ms of CPU per request).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import model_alone
from bench.cli import one_line_errors, positive_int, positive_ints, write_json_atomic
from training.errors import check_output_file

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


def multipart_body(jpeg: bytes) -> bytes:
    """A multipart/form-data body with `jpeg` in field 'file', as /predict takes it."""
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def http_request(host: str, port: int, jpeg: bytes) -> bytes:
    body = multipart_body(jpeg)
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
            status_line = (await reader.readline()).split()
            if len(status_line) < 2:  # b"": the server closed the connection (it died?)
                raise ConnectionResetError("the server closed the connection without an answer")
            status = int(status_line[1])
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
        *(["--decode-threads", str(args.decode_threads)] if args.decode_threads else []),
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


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


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


def merge(results: list[LoadResult]) -> LoadResult:
    """Several measured windows at one concurrency as one: their requests, times and counters."""
    out = LoadResult(results[0].concurrency, sum(r.seconds for r in results))
    out.server_cpu_s = sum(r.server_cpu_s for r in results)
    out.event_loop_cpu_s = sum(r.event_loop_cpu_s for r in results)
    for r in results:
        out.latencies += r.latencies
        for status, n in r.statuses.items():
            out.statuses[status] = out.statuses.get(status, 0) + n
        for k, v in r.metrics.items():
            out.metrics[k] = out.metrics.get(k, 0.0) + v
    return out


def best_cell(alones: list[list[dict]]) -> tuple[int, int]:
    """The model alone's best batch size and process layout, from all rounds of a configuration:
    the (layout, batch size) with the highest median images/s.

    Why not each round's own fastest: a round times its cells one after another, a second each,
    on CPUs whose speed drifts by 2x within seconds, and the largest of several such samples
    overstates the model's speed, the more so the more cells there are to pick from."""
    cells = [(g, b) for g, timing in enumerate(alones[0]) for b in timing["batches"]]
    return max(cells, key=lambda c: statistics.median(
        alone[c[0]]["batches"][c[1]]["images_per_s"] for alone in alones
    ))  # fmt: skip


def compare(result: LoadResult, alone: list[dict], cell: tuple[int, int]) -> dict:
    """One round: the load window against the model-alone timings taken right after it, at the
    configuration's best cell (`best_cell`); also against the round's own fastest cell."""
    best = alone[cell[0]]["batches"][cell[1]]["images_per_s"]
    fastest = max(r["images_per_s"] for m in alone for r in m["batches"].values())
    batch1 = [m["batches"][1]["ms"] for m in alone if m["procs"] == 1 and 1 in m["batches"]]
    p50 = result.percentile(50)
    return {
        "rps": result.rps, "p50_ms": p50, "model_alone_best": best, "ratio": result.rps / best,
        "model_alone_fastest": fastest, "ratio_vs_fastest": result.rps / fastest,
        "model_alone_batch1_ms": batch1[0] if batch1 else float("nan"),
        "p50_minus_batch1_ms": p50 - batch1[0] if batch1 else float("nan"),
    }  # fmt: skip


def median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _summary_row(label: str, c: int, rounds: list[dict], merged: LoadResult, workers: int) -> dict:
    m, window = merged.metrics, merged.seconds * workers

    def per_request_ms(seconds: float) -> float:
        return seconds / merged.ok * 1000 if merged.ok else float("nan")

    count = m.get("inference_batch_size_count", 0.0)
    return {
        "config": label, "concurrency": c, "rps": merged.rps, "p50_ms": merged.percentile(50),
        "p99_ms": merged.percentile(99), "statuses": merged.statuses,
        "mean_batch": m.get("inference_batch_size_sum", 0.0) / count if count else float("nan"),
        "server_cpu_ms": per_request_ms(merged.server_cpu_s),
        "event_loop_cpu_ms": per_request_ms(merged.event_loop_cpu_s),
        "decode_ms": per_request_ms(m.get("image_decode_seconds_sum", float("nan"))),
        # Where the limit sits: the share of the window each process spent in the forward
        # pass (device transfer included), and on its event loop's CPU.
        "model_busy": m.get("inference_batch_seconds_sum", float("nan")) / window,
        "event_loop_busy": merged.event_loop_cpu_s / window,
        "ratio": median_range([r["ratio"] for r in rounds]),
        "ratio_vs_fastest": median_range([r["ratio_vs_fastest"] for r in rounds]),
        "p50_minus_batch1_ms": median_range([r["p50_minus_batch1_ms"] for r in rounds]),
        "rounds": rounds,
    }  # fmt: skip


def _measure_config(
    args: argparse.Namespace,
    whole: model_alone.Resident,
    precision: str,
    uploads: list[bytes],
    config: tuple[str, int, int],
) -> tuple[str, list[dict], dict]:
    """One configuration (a server with its batching and processes) at every load level:
    its label, its rows and its model-alone baseline."""
    name, max_batch, workers = config
    cpus = os.cpu_count() or 1
    threads = args.threads or max(1, cpus // workers)
    label = name + (f", {workers} processes x {threads} thread(s)" if workers > 1 else "")
    rows = []
    with ExitStack() as config_stack:
        groups = [whole]
        if workers > 1:  # N processes with the service's threads each: its own ceiling
            groups.append(config_stack.enter_context(model_alone.Resident(
                args.checkpoint, args.device, precision, args.model_batches, threads, workers
            )))  # fmt: skip
        proc, url = start_server(args, precision, max_batch, workers)
        config_stack.callback(stop_server, proc)
        host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        requests = [http_request(host, port, u) for u in uploads]
        levels_run = []  # per level: (concurrency, its windows, the timings after each)
        for c in args.concurrency:
            asyncio.run(_load(host, port, requests, c, 0.0, args.warmup))
            results, alones = [], []
            for _ in range(args.rounds):
                # Load, then (the server idle) the model alone: each round's ratio
                # compares measurements seconds apart.
                results.append(asyncio.run(_load(
                    host, port, requests, c, args.seconds, args.round_warmup, proc.pid
                )))  # fmt: skip
                alones.append([g.time(args.model_seconds) for g in groups])
            levels_run.append((c, results, alones))
        points = [alone for _, _, alones in levels_run for alone in alones]
        cell = best_cell(points)
        cell_info = {"procs": points[0][cell[0]]["procs"], "batch": cell[1]}
        for c, results, alones in levels_run:
            rounds = [compare(r, a, cell) for r, a in zip(results, alones, strict=True)]
            row = _summary_row(label, c, rounds, merge(results), workers)
            row["model_alone_cell"] = cell_info
            rows.append(row)
            print(f"{label}, c={c}: {row['rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, "
                  f"p99 {row['p99_ms']:.1f} ms, batch {row['mean_batch']:.1f}, "
                  f"{row['ratio'][0] * 100:.0f}% of the model alone, {row['statuses']}",
                  file=sys.stderr)  # fmt: skip
    return label, rows, {"config": label, "points": points}


def _describe(exc: BaseException) -> str:
    """One line for a failed configuration: the exception's type and its first line."""
    if isinstance(exc, SystemExit) and isinstance(exc.code, int):  # model_alone.Resident's
        return f"a timing process failed (exit status {exc.code}; its error is above)"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0]
    )
    model_alone.add_model_arguments(parser)
    # Every list and count is checked here: `--workers 1,0` failed with ZeroDivisionError
    # after the first configuration had been measured, and took its figures with it.
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 8, 32, 64])
    parser.add_argument(
        "--rounds", type=positive_int, default=4, help="load/model-alone pairs per level"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="measured seconds of load per round"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds of load before each level"
    )
    parser.add_argument(
        "--round-warmup", type=float, default=1.0,
        help="unmeasured seconds of load at the start of each round (the server idled meanwhile)",
    )  # fmt: skip
    parser.add_argument("--model-batches", type=positive_ints, default=[1, 8, 32])
    parser.add_argument(
        "--model-seconds", type=float, default=1.0,
        help="seconds the model alone is timed per batch size, after each load window",
    )  # fmt: skip
    parser.add_argument("--max-batch-size", type=positive_int, default=32)
    parser.add_argument(
        "--delay-ms", type=float, default=2.0, help="max_batch_delay_ms of the server"
    )
    parser.add_argument(
        "--workers", type=positive_ints, default=[1], help="server process counts to try, e.g. 1,2"
    )
    parser.add_argument(
        "--threads", type=positive_int, help="--threads of the server (default: its own)"
    )
    parser.add_argument(
        "--decode-threads", type=positive_int,
        help="--decode-threads of the server (default: its own)",
    )  # fmt: skip
    parser.add_argument(
        "--no-unbatched", action="store_true", help="skip the max_batch_size=1 baseline"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.model_seconds <= 0:
        parser.error("--seconds and --model-seconds must be more than 0")
    if args.json_out:
        with one_line_errors():
            check_output_file("--json-out", args.json_out)
    batches = args.model_batches
    cpus = os.cpu_count() or 1

    rows, baselines, failures = [], [], []
    with ExitStack() as stack:
        # The model alone in one process on all cores, for every configuration; it also tells
        # the precision the service will choose (on a CPU: the faster of fp32 and bf16).
        whole = stack.enter_context(model_alone.Resident(
            args.checkpoint, args.device, args.precision, batches, args.threads, 1
        ))  # fmt: skip
        precision = whole.info["precision"]
        uploads = jpeg_uploads(64)
        configs = [
            (f"service, batching (max {args.max_batch_size}, {args.delay_ms:g} ms)", args.max_batch_size, w)
            for w in args.workers
        ]  # fmt: skip
        if not args.no_unbatched:
            configs.append(("service, batching off (max_batch_size=1)", 1, args.workers[0]))
        for config in configs:
            # One configuration's failure (a server that died, a dropped connection, a timing
            # process gone) is recorded and the next one runs: it cost every figure before.
            # SystemExit too: model_alone.Resident exits that way when a timing process dies.
            try:
                _, config_rows, baseline = _measure_config(args, whole, precision, uploads, config)
            except (Exception, SystemExit) as exc:
                failure = {"config": config[0], "workers": config[2], "error": _describe(exc)}
                failures.append(failure)
                print(f"{config[0]}, {config[2]} process(es): failed: {failure['error']}",
                      file=sys.stderr, flush=True)  # fmt: skip
                continue
            rows += config_rows
            baselines.append(baseline)

    device = whole.info["device"]
    print(f"\ndevice: {device}, precision {precision}, torch {torch.__version__}, {cpus} CPUs, "
          f"{args.rounds} rounds of {args.seconds:g} s per level, decoding threads per process: "
          f"{args.decode_threads or 'one per CPU'}\n")  # fmt: skip
    print("Model alone (no HTTP), timed after each round's load window: range over a "
          "configuration's rounds.\n")  # fmt: skip
    print("| next to | processes x threads | "
          + " | ".join(f"batch {b}: ms / images/s" for b in batches) + " |")  # fmt: skip
    print("| --- | --- |" + " ---: |" * len(batches))
    for entry in baselines:
        for k in range(len(entry["points"][0])):
            series = [point[k] for point in entry["points"]]
            cells = []
            for b in batches:
                ms = [m["batches"][b]["ms"] for m in series]
                ips = [m["batches"][b]["images_per_s"] for m in series]
                cells.append(f"{min(ms):.2f}-{max(ms):.2f} / {min(ips):.1f}-{max(ips):.1f}")
            first = series[0]
            print(
                f"| {entry['config']} | {first['procs']} x {first['threads']} | {' | '.join(cells)} |"
            )
    print("\n| configuration | concurrency | requests/s | p50 ms | p99 ms | mean batch | "
          "server CPU ms/request (event loop) | decode ms/request | busy: model / event loop | "
          "model alone's best: processes x batch | vs model alone, per round: median (range) | "
          "vs each round's fastest cell | p50 - model batch 1, per round: median (range) |")  # fmt: skip
    print("| --- |" + " ---: |" * 12)
    for r in rows:
        batch = "n/a" if r["mean_batch"] != r["mean_batch"] else f"{r['mean_batch']:.1f}"
        ratio, fastest, gap = r["ratio"], r["ratio_vs_fastest"], r["p50_minus_batch1_ms"]
        cell = r["model_alone_cell"]
        print(f"| {r['config']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{batch} | {r['server_cpu_ms']:.2f} ({r['event_loop_cpu_ms']:.2f}) | {r['decode_ms']:.2f} | "
              f"{r['model_busy'] * 100:.0f}% / {r['event_loop_busy'] * 100:.0f}% | "
              f"{cell['procs']} x {cell['batch']} | "
              f"{ratio[0] * 100:.0f}% ({ratio[1] * 100:.0f}-{ratio[2] * 100:.0f}%) | "
              f"{fastest[0] * 100:.0f}% ({fastest[1] * 100:.0f}-{fastest[2] * 100:.0f}%) | "
              + (f"{gap[0]:+.1f} ms ({gap[1]:+.1f} to {gap[2]:+.1f}) |" if r["concurrency"] == 1 else " |"))  # fmt: skip
    for failure in failures:
        print(f"\nnot measured: {failure['config']}, {failure['workers']} process(es): "
              f"{failure['error']}")  # fmt: skip
    if args.json_out:
        write_json_atomic(args.json_out, {
            "device": device, "precision": precision, "baselines": baselines, "rows": rows,
            "failures": failures,
        })  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
