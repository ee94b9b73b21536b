"""Dockerfile and docker-compose.yml, checked without a Docker engine: lint, schema, contents,
and the image's CMD and HEALTHCHECK run on this machine the way the image would run them."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, cli_env

DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} is missing: pip install -e '.[dev]' installs it"
    return path


def instruction(name: str) -> str:
    """The (last) Dockerfile instruction `name`, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    lines = [line for line in joined.splitlines() if line.startswith(name + " ")]
    assert lines, f"no {name} in the Dockerfile"
    return lines[-1][len(name) + 1 :].strip()


def exec_form(text: str) -> list[str]:
    return json.loads(text)


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_service_reserves_an_nvidia_gpu_and_publishes_8000() -> None:
    api = COMPOSE["services"]["api"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert api["restart"] == "unless-stopped"
    assert "app.healthcheck" in " ".join(api["healthcheck"]["test"])
    assert any(v.startswith("./weights:") and v.endswith(":ro") for v in api["volumes"])
    assert "APP_DEVICE" in api["environment"] and "APP_MAX_BATCH_SIZE" in api["environment"]


def test_cpu_variant_has_no_device_reservation() -> None:
    cpu = COMPOSE["services"]["api-cpu"]
    assert "cpu" in cpu["profiles"]
    assert "deploy" not in cpu
    assert cpu["environment"]["APP_DEVICE"] == "cpu"


def test_compose_variables_are_settings_and_the_gpu_runs_two_processes() -> None:
    from app.settings import Settings

    fields = set(Settings.model_fields)
    for name in ("api", "api-cpu"):
        env = COMPOSE["services"][name]["environment"]
        unknown = [k for k in env if k.startswith("APP_") and k[4:].lower() not in fields]
        assert not unknown, f"{name}: no such setting: {unknown}"
        # Every setting passes through (the Dockerfile fixes where it listens).
        missing = [f for f in fields - {"host", "port"} if f"APP_{f.upper()}" not in env]
        assert not missing, f"{name}: not passed through: {missing}"
    # measured: two processes served 2.1x one on an H200; on 2 CPU cores one process of two
    # threads answers a lone request faster
    assert COMPOSE["services"]["api"]["environment"]["APP_WORKERS"] == "${APP_WORKERS:-2}"
    assert COMPOSE["services"]["api-cpu"]["environment"]["APP_WORKERS"] == "${APP_WORKERS:-1}"


def test_train_profile_runs_training_on_the_gpu() -> None:
    train = COMPOSE["services"]["train"]
    assert "train" in train["profiles"]
    assert train["entrypoint"][:3] == ["python", "-m", "training.run"]
    assert train["shm_size"]
    assert any(v.startswith("./data:") for v in train["volumes"])
    assert any(v.startswith("./runs:") for v in train["volumes"])
    assert train["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_healthcheck_calls_health() -> None:
    assert "/health" in (ROOT / "app" / "healthcheck.py").read_text()
    assert exec_form(instruction("HEALTHCHECK").split("CMD", 1)[1]) == [
        "python",
        "-m",
        "app.healthcheck",
    ]


def test_dockerfile_installs_what_pyproject_declares() -> None:
    """Step 1 installs [project].dependencies read from pyproject.toml itself, step 2 the project
    with `pip install --no-deps -e .` (the README's `pip install -e .`, dependencies done)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    run = next(
        line for line in re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines() if "tomllib" in line
    )
    script = re.search(r'python -c "(.*?)" >', run).group(1)
    listed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert [x for x in listed if x] == declared
    assert "pip install -r /tmp/requirements.txt" in run
    assert "RUN pip install --no-deps -e ." in DOCKERFILE
    assert "pip install -e ." in (ROOT / "README.md").read_text()
    # Dependencies come before the code, so a code change does not reinstall torch.
    assert DOCKERFILE.index("requirements.txt") < DOCKERFILE.index("COPY training")
    assert re.search(r"^USER \d+$", DOCKERFILE, re.M), "runs as a non-root user"
    assert "EXPOSE 8000" in DOCKERFILE and "COPY weights" in DOCKERFILE


def test_dockerignore_keeps_data_and_checkpoints_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "data", "runs", "*.pt", "**/__pycache__"):
        assert entry in ignored


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_image_cmd_serves_and_healthcheck_passes_outside_a_container() -> None:
    """Start the image's CMD with the image's environment (the port and the weights path
    adapted to this machine), poll the image's HEALTHCHECK until it passes, then SIGTERM."""
    env = cli_env()
    for key, value in re.findall(r"(APP_\w+)=(\S+)", instruction("ENV")):
        env[key] = value
    env["APP_PORT"] = str(_free_port())
    env["APP_CHECKPOINT"] = str(ROOT / "weights")
    env["APP_HOST"] = "127.0.0.1"
    cmd = exec_form(instruction("CMD"))
    check = exec_form(instruction("HEALTHCHECK").split("CMD", 1)[1])
    cmd[0] = check[0] = sys.executable  # "python" in the image
    server = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 120
        healthy = False
        while time.time() < deadline and server.poll() is None:
            if subprocess.run(check, cwd=ROOT, env=env, capture_output=True).returncode == 0:
                healthy = True
                break
            time.sleep(0.5)
        assert healthy, "HEALTHCHECK never passed"
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert server.returncode == 0, output  # a graceful stop is a success
    assert "Application shutdown complete" in output
    assert "Traceback" not in output
    # Once the server is gone, the health check fails (it is not a constant "true").
    assert subprocess.run(check, cwd=ROOT, env=env, capture_output=True).returncode == 1
