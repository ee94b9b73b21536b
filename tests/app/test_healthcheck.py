"""`python -m app.healthcheck`, Docker's HEALTHCHECK: exit 0 on a 200 from /health, 1
otherwise, and --help that answers without probing anything. A tiny HTTP server in this
process stands in for the app."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from tests.app.support import free_port
from tests.helpers import cli_env, run_cli


class Health(BaseHTTPRequestHandler):
    status: ClassVar[int] = 200  # what GET /health answers
    requests: ClassVar[list[str]] = []  # the paths asked for

    def do_GET(self) -> None:
        Health.requests.append(self.path)
        self.send_response(Health.status)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def health_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The port of a /health server that answers Health.status and records Health.requests."""
    monkeypatch.setattr(Health, "requests", [])
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_exit_status_follows_health(
    health_port: int, monkeypatch: pytest.MonkeyPatch, status: int, code: int
) -> None:
    monkeypatch.setattr(Health, "status", status)
    result = run_cli("-m", "app.healthcheck", env=cli_env(APP_PORT=str(health_port)))
    assert result.returncode == code, result.stderr
    assert Health.requests == ["/health"]


def test_no_server_is_unhealthy() -> None:
    result = run_cli("-m", "app.healthcheck", env=cli_env(APP_PORT=str(free_port())))
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: http://127.0.0.1:"), result.stderr


def test_help_answers_without_probing(health_port: int) -> None:
    result = run_cli("-m", "app.healthcheck", "--help", env=cli_env(APP_PORT=str(health_port)))
    assert result.returncode == 0, result.stderr
    assert "usage: python -m app.healthcheck" in result.stdout and "APP_PORT" in result.stdout
    assert Health.requests == []
