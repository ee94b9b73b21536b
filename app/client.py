"""A Python client for the service, and `python -m app.client` to use it from a shell.

from app.client import Client
client = Client("http://127.0.0.1:8000")
client.predict("cat.jpg")                  # {"label": "cat", "confidence": 0.91, ...}
client.predict_many(["a.png", "b.jpg"])    # one result per path, in order

python -m app.client predict cat.jpg dog.png --url http://127.0.0.1:8000
python -m app.client evaluate --url http://127.0.0.1:8000 --data-dir DIR
    uploads every DIR/test/<class>/* image (bounded concurrency) and reports accuracy,
    per-class accuracy and throughput; with --compare PREDICTIONS.json (written by
    `python -m training.evaluate ... --predictions-out`) it counts the images on which
    the server and the offline evaluation disagree.

Exit status of `predict`: 0 when every file got a prediction, 1 when some file did not (its
line has an "error": the server refused it, it could not be read, or no answer came), 2 when
the command could not run (bad arguments, no server). Of `evaluate`: the same, 1 when some
test image got no prediction (counted as wrong in the accuracy, and not compared with the
offline predictions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from training.cli_args import path_arg
from training.errors import UserError, check_output_file
from training.folders import class_difference, list_image_folder, resolve_image_root
from training.interrupts import exit_status
from training.report import per_class_lines

DEFAULT_URL = "http://127.0.0.1:8000"


class APIError(Exception):
    """The service answered with an error: `status`, `code` and `detail` from its JSON body."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class UnreadableFile(Exception):
    """A file that could not be read, so it was not sent; `path` and `reason`."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path, self.reason = path, reason


class TransferFailed(Exception):
    """A file whose request got no answer (the connection failed or timed out); `path` and
    the httpx `error`."""

    def __init__(self, path: Path, error: httpx.TransportError) -> None:
        super().__init__(f"no answer for {path}: {str(error) or type(error).__name__}")
        self.path, self.error = path, error


# What predict_many gives for a file instead of a prediction.
Failure = APIError | UnreadableFile | TransferFailed


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise UnreadableFile(path, "it is a folder; pass the image files in it") from None
    except OSError as exc:
        raise UnreadableFile(path, exc.strerror or str(exc)) from None


def _answer(response: httpx.Response, expect: str) -> dict[str, Any]:
    """The JSON object answered, which has the key `expect`; APIError 'bad_response' for an
    answer that is not this service's (a wrong port, a proxy's page: HTML with a 200 was taken
    for a prediction, and evaluate ended in a KeyError traceback)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or expect not in body:
        raise APIError(
            response.status_code,
            "bad_response",
            f"not an answer of this service (is the URL right?): {response.text[:200]!r}",
        )
    return body


def _raise_for_error(response: httpx.Response, expect: str) -> dict[str, Any]:
    """`_answer`, or APIError with the service's error code and detail for an error status."""
    if response.status_code >= 400:
        body = _answer(response, "error")
        raise APIError(response.status_code, body["error"], body.get("detail", ""))
    return _answer(response, expect)


class Client:
    """Synchronous calls; `predict_many` (and this module's `evaluate`) run requests
    concurrently."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.MockTransport | None = None,  # tests: answers without a server
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.timeout_s = timeout_s
        self.transport = transport

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers=self.headers,
            timeout=self.timeout_s,
            transport=self.transport,
        )

    def health(self) -> dict[str, Any]:
        with self._client() as c:
            return _answer(c.get("/health"), "status")  # 503 while loading: its status too

    def model(self) -> dict[str, Any]:
        with self._client() as c:
            return _raise_for_error(c.get("/model"), "classes")

    def predict(self, path: str | Path, top_k: int = 5) -> dict[str, Any]:
        """The prediction for one image file: label, class_id, confidence, top_k."""
        path = Path(path)
        with self._client() as c:
            response = c.post(
                "/predict", params={"top_k": top_k}, files={"file": (path.name, path.read_bytes())}
            )
        return _raise_for_error(response, "class_id")

    def predict_many(
        self, paths: Sequence[str | Path], top_k: int = 5, concurrency: int = 16
    ) -> list[dict[str, Any] | Failure]:
        """One result per path, in order: a prediction, or the APIError (the server refused the
        file), UnreadableFile (it was not sent) or TransferFailed (no answer came) for that
        file. httpx.TransportError when no file got an answer: the server cannot be reached."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        return asyncio.run(self._predict_many([Path(p) for p in paths], top_k, concurrency))

    async def _predict_many(
        self, paths: list[Path], top_k: int, concurrency: int
    ) -> list[dict[str, Any] | Failure]:
        limit = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=self.timeout_s, limits=limits,
            transport=self.transport,
        ) as c:  # fmt: skip

            async def one(path: Path) -> dict[str, Any] | Failure:
                async with limit:
                    try:
                        data = await asyncio.to_thread(_read, path)
                    except UnreadableFile as exc:
                        return exc
                    try:
                        for attempt in range(5):
                            response = await c.post(
                                "/predict",
                                params={"top_k": top_k},
                                files={"file": (path.name, data)},
                            )
                            if response.status_code != 503 or attempt == 4:
                                break
                            # Busy: honour Retry-After, as a well-behaved client should.
                            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                    except httpx.TransportError as exc:
                        # This file's alone: one failed transfer used to abort all the others.
                        return TransferFailed(path, exc)
                    try:
                        return _raise_for_error(response, "class_id")
                    except APIError as exc:
                        return exc

            results = await asyncio.gather(*(one(p) for p in paths))
        failed = [r for r in results if isinstance(r, TransferFailed)]
        if failed and not any(isinstance(r, dict | APIError) for r in results):
            raise failed[0].error  # nothing answered: no server, not a bad file
        return results


PREDICTIONS_FORMAT = (
    "expected {image name: class id} as `python -m training.evaluate MODEL --data-dir DIR "
    "--predictions-out FILE` writes it"
)


def load_offline_predictions(path: Path, names: list[str], classes: list[str]) -> dict[str, int]:
    """--compare's file, checked against the data (`names`, `classes`) before any upload."""
    try:
        offline = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read --compare {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # not JSON, or not text at all
        raise UserError(f"--compare {path} is not JSON ({exc}); {PREDICTIONS_FORMAT}") from None
    if not isinstance(offline, dict):
        raise UserError(f"--compare {path} holds a {type(offline).__name__}; {PREDICTIONS_FORMAT}")
    for name, class_id in offline.items():
        if type(class_id) is not int:  # bool is an int subclass, and no class id
            raise UserError(
                f"--compare {path} maps {name!r} to {json.dumps(class_id)[:40]}, not a class id; "
                f"{PREDICTIONS_FORMAT}"
            )
    if not offline.keys() & set(names):
        example = f" (its names look like {next(iter(offline))!r})" if offline else ""
        raise UserError(
            f"--compare {path} names none of the {len(names)} test images{example}; the data's "
            f"are {names[0]!r}, ...: pass the predictions of the same --data-dir"
        )
    for name, class_id in offline.items():
        if not 0 <= class_id < len(classes):
            raise UserError(
                f"--compare {path} gives {name!r} class id {class_id}, but the data has "
                f"{len(classes)} classes (ids 0 to {len(classes) - 1})"
            )
    return offline


def evaluate(
    client: Client, data_dir: Path, concurrency: int = 16, compare: Path | None = None
) -> dict[str, Any]:
    """Upload every test image and score the answers (see the module docstring). Everything
    that can be checked without uploading is checked first."""
    if concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, not {concurrency}")
    root = resolve_image_root(data_dir, "test")
    paths, labels, classes = list_image_folder(root / "test")
    names = [p.relative_to(root).as_posix() for p in paths]
    offline = None if compare is None else load_offline_predictions(compare, names, classes)
    served_classes = client.model()["classes"]
    if served_classes != classes:
        raise UserError(
            "the server's classes are not the data's: "
            + class_difference(served_classes, "the server", classes, "the data")
        )
    start = time.perf_counter()
    results = client.predict_many(paths, top_k=1, concurrency=concurrency)
    seconds = time.perf_counter() - start
    errors = {n: str(r) for n, r in zip(names, results, strict=True) if not isinstance(r, dict)}
    predicted = {
        n: r["class_id"] for n, r in zip(names, results, strict=True) if isinstance(r, dict)
    }
    correct = [0] * len(classes)
    total = [0] * len(classes)
    for name, label in zip(names, labels, strict=True):
        total[label] += 1
        correct[label] += predicted.get(name) == label
    report: dict[str, Any] = {
        "url": client.url,
        "images": len(paths),
        "errors": len(errors),
        "error_examples": dict(list(errors.items())[:5]),
        "accuracy": sum(correct) / len(paths) * 100,
        "per_class": {
            c: round(k / max(1, n) * 100, 2)
            for c, k, n in zip(classes, correct, total, strict=True)
        },
        "seconds": seconds,
        "requests_per_s": len(paths) / seconds,
        "concurrency": concurrency,
    }
    if offline is not None:
        common = [n for n in names if n in offline and n in predicted]
        differ = [n for n in common if offline[n] != predicted[n]]
        report["compared"] = len(common)
        report["not_compared"] = sum(n in offline and n not in predicted for n in names)
        report["disagreements"] = len(differ)
        # None, not 100%, when nothing could be compared (every image refused).
        report["agreement"] = (1 - len(differ) / len(common)) * 100 if common else None
        report["disagreement_examples"] = {
            n: {"offline": classes[offline[n]], "served": classes[predicted[n]]}
            for n in differ[:20]
        }
    return report


def _top_k(text: str) -> int:
    """--top-k as the server takes it: checked here, not refused once per file."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to 10, not {text!r}")
    return value


def _predict(client: Client, images: list[Path], top_k: int) -> int:
    """One JSON line per image, in order; 1 when any image failed, else 0."""
    results = client.predict_many(images, top_k=top_k)
    for path, result in zip(images, results, strict=True):
        body = result if isinstance(result, dict) else {"error": str(result)}
        print(json.dumps({"file": str(path), **body}))
    failed = sum(not isinstance(r, dict) for r in results)
    if failed:
        print(
            f'{failed} of {len(images)} files got no prediction (their lines have an "error")',
            file=sys.stderr,
        )
    return 1 if failed else 0


def _bad_url(url: str) -> str | None:
    """What is wrong with --url, found before anything is sent (httpx raised tracebacks)."""
    if not url.startswith(("http://", "https://")):  # else: "cannot reach ... is it running?"
        return f"--url {url} must start with http:// or https://"
    try:
        port = httpx.URL(url).port
    except httpx.InvalidURL as exc:
        return f"--url {url} is not a valid URL ({exc})"
    if port is not None and not 0 < port < 65536:
        return f"--url {url}: the port must be 1 to 65535"
    return None


def _bad_key(key: str | None) -> str | None:
    """The server takes ASCII keys only (an HTTP header carries it); httpx raised a traceback."""
    if key is not None and not key.isascii():
        return "--api-key: use ASCII characters only (an HTTP header carries the key)"
    return None


def _no_answer(url: str, exc: httpx.HTTPError) -> str:
    """Why nothing came back: no connection at all, or a server that took the requests and
    did not answer them (timed out, or closed the connection), which 'is it running?' misled."""
    detail = str(exc) or type(exc).__name__  # httpx's timeouts may carry no message
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot reach {url} ({detail}); is the server running?"
    return (
        f"no answer from {url} ({detail}); the server took the requests but answered none: "
        "see its log (overloaded, or stopped?)"
    )


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    common.add_argument("--api-key", default=None, help="X-API-Key, when the server requires one")
    parser = argparse.ArgumentParser(
        prog="python -m app.client", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_predict = sub.add_parser(
        "predict",
        help="classify image files",
        description='Print one JSON line per file: its prediction, or an "error" (the server '
        "refused the file, it could not be read, or no answer came).",
        epilog="exit status: 0 when every file got a prediction, 1 when some file did not, "
        "2 when the command could not run (bad arguments, no server), 130 on Ctrl-C",
        parents=[common],
    )
    p_predict.add_argument("images", nargs="+", type=path_arg)
    p_predict.add_argument("--top-k", type=_top_k, default=5, help="classes per image, 1..10")
    p_eval = sub.add_parser(
        "evaluate",
        help="accuracy of the served model over HTTP",
        epilog="exit status: 0 when every test image got a prediction, 1 when some did not "
        "(counted as wrong), 2 when the command could not run (bad arguments, no server), 130 "
        "on Ctrl-C",
        parents=[common],
    )
    p_eval.add_argument("--data-dir", type=path_arg, required=True, help="DIR/test/<class>/<image>")
    p_eval.add_argument("--concurrency", type=int, default=16, help="requests at a time (>= 1)")
    p_eval.add_argument(
        "--compare", type=path_arg, help="offline predictions JSON (training.evaluate)"
    )
    p_eval.add_argument("--json-out", type=path_arg, help="write the full report here")
    args = parser.parse_args(argv)
    if problem := _bad_url(args.url) or _bad_key(args.api_key):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    client = Client(args.url, args.api_key)
    try:
        if args.command == "predict":
            return _predict(client, args.images, args.top_k)
        if args.json_out is not None:
            check_output_file("--json-out", args.json_out)  # now: the report must not be lost
        report = evaluate(client, args.data_dir, args.concurrency, args.compare)
    except (UserError, APIError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: {_no_answer(args.url, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: asyncio has cancelled the requests; no traceback
        return 130
    print(
        f"{report['images']} images over HTTP: {report['accuracy']:.2f}% top-1, "
        f"{report['errors']} errors, {report['requests_per_s']:.1f} requests/s "
        f"(concurrency {report['concurrency']})"
    )
    for line in per_class_lines(report["per_class"]):
        print(line)
    if "disagreements" in report:
        refused = report["not_compared"]
        if report["agreement"] is None:
            print(
                f"agreement with the offline evaluation: unknown ({refused} images refused or unreadable)"
            )
        else:
            print(
                f"agreement with the offline evaluation: {report['agreement']:.2f}% "
                f"({report['disagreements']} of {report['compared']} images differ"
                + (f"; {refused} not compared: refused, or unreadable here)" if refused else ")")
            )
    if args.json_out:
        try:
            args.json_out.write_text(json.dumps(report, indent=1))
        except OSError as exc:
            print(f"error: cannot write {args.json_out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    if report["errors"]:
        example = next(iter(report["error_examples"].items()))
        print(
            f"{report['errors']} of {report['images']} images got no prediction, e.g. "
            f"{example[0]}: {example[1]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
