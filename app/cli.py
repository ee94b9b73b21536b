"""python -m app: start the HTTP service (uvicorn) on a checkpoint. Every flag is also an
APP_* environment variable; see `python -m app --help`."""

from __future__ import annotations

import difflib
import errno
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from app import workers
from app.protocol import guarded_protocol
from app.settings import Settings
from training.errors import UserError
from training.interrupts import stop_status

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("app")


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        flag = "--" + name.replace("_", "-")
        secret = name == "api_key"  # never echoed to a terminal or a log
        got = "" if secret else f", got {err.get('input')!r}"
        parts.append(f"{flag} (APP_{name.upper()}): {err['msg']}{got}")
    return "; ".join(parts)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each APP_* variable that is no setting: a typo would otherwise be silently
    ignored (a warning, not an error: a deployment may hold other APP_* variables)."""
    names = [f"APP_{name.upper()}" for name in Settings.model_fields]
    lines = []
    for key in sorted(k for k in environ if k.startswith("APP_") and k not in names):
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"{key} is not a setting of this service and is ignored{hint}")
    return lines


def _flag_values(args: list[str], flag: str) -> Iterator[str]:
    """The values given to `flag` (any capitalisation, as the command line takes it)."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg.lower() == flag and i + 1 < len(args):
            yield args[i + 1]
        elif arg.lower().startswith(flag + "="):
            yield arg.partition("=")[2]


def unusable_flag(args: list[str]) -> str | None:
    """What is wrong with a flag whose value the command line would quietly read as "not
    given", if anything: `--api-key "$KEY"` with KEY unset is blank, and `null` (what `jq -r
    .key` prints for a missing key) reads as no key, both leaving the service open; a blank
    `--checkpoint "$CKPT"` served the shipped weights/. (A blank APP_API_KEY stays 'no key':
    docker-compose.yml passes an empty one when none is set.)"""
    for value in _flag_values(args, "--api-key"):
        if not value.strip():
            return "--api-key is blank (an unset shell variable?); " + _KEY_WAYS
        if value.strip() == "null":
            return (
                "--api-key is null, which the command line reads as no key (a missing value?); "
                + _KEY_WAYS
            )
    for value in _flag_values(args, "--checkpoint"):
        if not value.strip():
            return (
                "--checkpoint is blank (an unset shell variable?); give the model's path, or "
                "leave the flag out to serve weights/"
            )
    return None


_KEY_WAYS = "give the key, or leave the flag out to serve without one"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if problem := unusable_flag(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        settings = Settings(_cli_parse_args=args)
    except ValidationError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # a flag argparse does not know, or one missing its value
        detail = str(exc).removeprefix("error parsing CLI: ")
        print(f"error: {detail}; see python -m app --help", file=sys.stderr)
        return 2
    try:
        # Before the model loads (seconds, minutes for a cold GPU): uvicorn found the port
        # taken only then, and said so in a traceback-like log line with exit code 3.
        workers.check_port_free(settings.host, settings.port)
    except OSError as exc:
        return _cannot_listen(settings, exc)
    try:
        from app.main import configure_logging, create_app  # FastAPI: only to serve

        configure_logging(settings.log_level)
        for line in unknown_variables(os.environ):
            log.warning(line)
        from app.predictor import load_predictor

        # Load before listening: a missing, corrupt or incompatible checkpoint is a one-line
        # error.
        predictor = load_predictor(settings.checkpoint, settings.device, settings.precision)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while it loads and warms up (later, uvicorn handles it)
        # At once, not after the load thread: that is still inside torch, and waiting for it
        # took seconds, in which a second Ctrl-C aborted the interpreter ('terminate called
        # without an active exception'). Nothing has been written that needs closing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    stops = workers.note_stops()
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": math.ceil(settings.graceful_shutdown_s),
    }
    if settings.workers == 1:
        # Built here: an error in it keeps its traceback (uvicorn reports a TypeError raised
        # inside a factory in one line).
        served = create_app(settings, predictor)

        def serving_app() -> FastAPI:
            workers.exit_if_stopped(stops)  # uvicorn calls this once its handlers are in place
            return served

        uvicorn.run(
            serving_app, factory=True, http=guarded_protocol(settings.read_timeout_s), **common
        )
    else:
        del predictor  # each worker process loads its own copy
        os.environ.update(settings.env())
        with tempfile.TemporaryDirectory(prefix="alexnet-serve-metrics-") as metrics_dir:
            # Before the workers import prometheus-client: /metrics then sums all processes.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            if not workers.supported():
                if stops:  # uvicorn's own supervisor would never see it
                    return stop_status(stops[0])
                uvicorn.run(
                    "app.main:worker_app_from_env",
                    factory=True,
                    workers=settings.workers,
                    # By path: uvicorn pickles its options for each worker process. Without it,
                    # no limit on headers, and an early answered body read for as long as it comes.
                    http="app.protocol:GuardedFromEnv",
                    **common,
                )
                return 0
            try:
                return workers.run_workers(
                    settings.workers,
                    graceful_shutdown_s=settings.graceful_shutdown_s,
                    stops=stops,
                    **common,
                )
            except OSError as exc:  # taken since the check above
                return _cannot_listen(settings, exc)
    return 0


def _cannot_listen(settings: Settings, exc: OSError) -> int:
    hint = {
        errno.EADDRINUSE: "another server there? choose --port",
        errno.EACCES: "ports below 1024 need privileges; choose --port",
    }.get(exc.errno or 0, "see --host")
    print(f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror} ({hint})",
          file=sys.stderr)  # fmt: skip
    return 1
