"""Settings (flags and APP_* variables) and `python -m app`'s failures before it listens: each is
exit code 2 and one `error:` line, without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import uvicorn
from pydantic import SecretStr, ValidationError

import app.settings
from app.cli import main
from app.settings import Settings
from tests.app.conftest import ServedModel
from tests.app.support import API_KEY
from tests.helpers import ROOT, assert_one_line_error, cli_env, run_cli
from training.artifact import INDEX_NAME


@pytest.fixture(autouse=True)
def no_app_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read APP_* variables: start each test without any."""
    for name in list(os.environ):
        if name.startswith("APP_"):
            monkeypatch.delenv(name)


# ---- Settings ---------------------------------------------------------------------------------


def test_the_readme_settings_table_is_every_setting_with_its_flag_and_default() -> None:
    """README's table is how users learn the settings; it once drifted from the code."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `APP_"):
            cells = [cell.strip() for cell in line.split("|")[1:4]]
            if " / " in cells[0]:  # `APP_HOST` / `APP_PORT`: a column each, in one row
                cells = [cell.split(" / ") for cell in cells]
            else:  # (a default of "CPUs / workers" is one value)
                cells = [[cell] for cell in cells]
            for variable, flag, default in zip(*cells, strict=True):
                rows[variable.strip("`")] = (flag.strip("`"), default.strip("`"))
    fields = Settings.model_fields
    assert set(rows) == {f"APP_{name.upper()}" for name in fields}
    computed = {"CPUs", "CPUs / workers", "unset"}  # said in words, not a value
    for name, field in fields.items():
        flag, default = rows[f"APP_{name.upper()}"]
        assert flag == "--" + name.replace("_", "-"), name
        if default not in computed:
            assert default == str(field.default), name
        else:
            assert field.default is None, name


def test_defaults() -> None:
    s = Settings()
    assert s.checkpoint == Path("weights")
    assert (s.device, s.precision, s.host, s.port) == ("auto", "auto", "127.0.0.1", 8000)
    assert s.api_key is None


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("APP_DEVICE", "CPU")
    monkeypatch.setenv("APP_API_KEY", API_KEY)
    s = Settings()
    assert s.max_batch_size == 4
    assert s.device == "cpu"
    assert isinstance(s.api_key, SecretStr) and s.api_key.get_secret_value() == API_KEY
    assert API_KEY not in repr(s)


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # docker-compose passes ${APP_THREADS:-} through as an empty string.
    monkeypatch.setenv("APP_THREADS", "")
    monkeypatch.setenv("APP_DECODE_THREADS", "")
    settings = Settings()
    assert settings.threads is None and settings.decode_threads is None


def test_flags_override_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("APP_PORT", "9000")
    s = Settings(_cli_parse_args=["--max-batch-size", "8", "--max-batch-delay-ms", "5.5"])
    assert (s.max_batch_size, s.max_batch_delay_ms, s.port) == (8, 5.5, 9000)


def test_a_port_refused_for_privileges_points_at_port(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import _cannot_listen

    assert _cannot_listen(Settings(port=80), PermissionError(13, "Permission denied")) == 1
    assert capsys.readouterr().err.strip() == (
        "error: cannot listen on 127.0.0.1:80: Permission denied (ports below 1024 need "
        "privileges; choose --port)"
    )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", " CUDA:0 "])
def test_device_spellings(device: str) -> None:
    assert Settings(device=device).device == device.strip().lower()


@pytest.mark.parametrize(
    "values",
    [
        {"device": "tpu"},
        {"device": "cuda:x"},
        {"device": "cuda:01"},  # torch.device refuses these: a traceback at load, not here
        {"device": "cuda:\u0661"},
        {"max_batch_size": 0},
        {"max_batch_size": 1025},
        {"port": 0},
        {"precision": "fp16"},
        {"request_timeout_s": 0},
        {"request_timeout_s": float("inf")},
        {"graceful_shutdown_s": float("inf")},  # crashed the start-up
        {"graceful_shutdown_s": float("nan")},
        {"graceful_shutdown_s": 1e7},  # the workers' supervisor crashed on SIGTERM (join)
        {"graceful_shutdown_s": 1e10},  # one process crashed on SIGTERM (Thread.join)
        {"api_key": "clé €"},  # no client can send it: header values are read as Latin-1
        {"max_upload_bytes": 10},
        {"max_batch_delay_ms": -1},
        {"max_image_pixels": 200_000_000},  # Pillow refuses images over 178,956,970 pixels
        {"max_batch_files": 1001},  # the form parser refuses more than 1000 files
    ],
)
def test_invalid_values_are_refused(values: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)


def test_threads_default_to_an_even_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes share the cores instead of each taking them all (README, serving)."""
    monkeypatch.setattr(app.settings, "available_cpus", lambda: 16)
    assert Settings().torch_threads() == 16
    assert Settings(workers=4).torch_threads() == 4
    assert Settings(workers=32).torch_threads() == 1
    assert Settings(workers=4, threads=3).torch_threads() == 3


def test_decoding_threads_default_to_one_per_core_and_follow_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.state import ServingState

    monkeypatch.setattr(app.settings, "available_cpus", lambda: 16)
    for settings, expected in ((Settings(workers=2), 16), (Settings(decode_threads=3), 3)):
        state = ServingState(settings, predictor=None)
        try:
            assert state.decoders._max_workers == expected
        finally:
            state.decoders.shutdown()
    for key, value in Settings(decode_threads=3).env().items():  # as worker processes get it
        monkeypatch.setenv(key, value)
    assert Settings().decode_threads == 3


def test_an_empty_api_key_means_none_and_whitespace_is_stripped() -> None:
    assert Settings(api_key="").api_key is None
    assert Settings(api_key="  \n").api_key is None
    key = Settings(api_key="s3cret\n").api_key  # as read from a file
    assert key is not None and key.get_secret_value() == "s3cret"


def test_env_round_trip_rebuilds_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What worker processes get: settings -> APP_* variables -> equal settings."""
    original = Settings(
        checkpoint=Path("/srv/model"),
        device="cpu",
        max_batch_size=7,
        max_batch_delay_ms=3.5,
        api_key=API_KEY,
        log_level="warning",
    )
    env = original.env()
    assert env["APP_API_KEY"] == API_KEY
    assert env["APP_MAX_BATCH_SIZE"] == "7"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt.model_dump(exclude={"api_key"}) == original.model_dump(exclude={"api_key"})
    assert rebuilt.api_key is not None and rebuilt.api_key.get_secret_value() == API_KEY
    assert "APP_API_KEY" not in Settings(api_key="").env()  # no key: none passed on


# ---- python -m app: fast failures -------------------------------------------------------------


def test_help_lists_the_flags_and_their_variables() -> None:
    result = run_cli("-m", "app", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--checkpoint", "--device", "--max-batch-size", "--api-key", "--precision"):
        assert flag in result.stdout
    assert "APP_MAX_BATCH_SIZE" in result.stdout
    # Optional settings read as their type: "--threads int", not "--threads {int,null}".
    assert "--threads int" in result.stdout and "null}" not in result.stdout


# `python -m app ARGS`, then whether PyTorch was loaded, on stderr.
RUN_APP_AND_TELL_TORCH = """
import runpy, sys
sys.argv = ["app", *sys.argv[1:]]
try:
    runpy.run_module("app", run_name="__main__", alter_sys=True)
finally:
    print("torch loaded:", "torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["--workers", "0"], ["--max-queu", "5"]])
def test_help_and_flag_errors_answer_before_pytorch_loads(args: list[str]) -> None:
    """The settings imported PyTorch (for a Pillow constant and a CPU count): --help and a
    mistyped flag took 1.5 s on 2 cores (files cached), where 0.2 s is enough."""
    result = run_cli("-c", RUN_APP_AND_TELL_TORCH, *args, timeout=60)
    assert result.returncode == (0 if args == ["--help"] else 2), result.stderr
    assert "torch loaded: False" in result.stderr


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--max-batch-size", "0"], ["--max-batch-size", "APP_MAX_BATCH_SIZE"]),
        (["--max-batch-size", "abc"], ["--max-batch-size", "abc"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--precision", "fp16"], ["--precision"]),
        (["--port", "70000"], ["--port"]),
        (["--max-queu", "5"], ["unrecognized arguments: --max-queu 5", "--help"]),  # a typo
        (["--workers"], ["--workers", "expected one argument"]),
    ],
)
def test_an_invalid_flag_is_one_line(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run_cli("-m", "app", *args, timeout=60), *fragments)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("APP_PORT", "abc"),
        ("APP_MAX_BATCH_SIZE", "0"),
        ("APP_DEVICE", "tpu"),
        ("APP_MAX_IMAGE_PIXELS", "200000000"),
    ],
)
def test_an_invalid_environment_variable_is_one_line(name: str, value: str) -> None:
    result = run_cli("-m", "app", timeout=60, env=cli_env(**{name: value}))
    assert_one_line_error(result, name, value)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--api-key", ""], "--api-key is blank"),
        (["--api-key=  "], "--api-key is blank"),
        (["--api-key", "\n"], "--api-key is blank"),
        (["--api-key", "null"], "--api-key is null, which the command line reads as no key"),
        (["--api-key=null"], "--api-key is null, which the command line reads as no key"),
        (["--API-KEY", "null"], "--api-key is null, which the command line reads as no key"),
        (["--Api-Key="], "--api-key is blank"),
    ],
)
def test_an_api_key_flag_that_would_mean_no_key_is_refused(
    args: list[str],
    problem: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--api-key "$KEY"` with KEY unset would serve with no key at all; so would `null`, what
    `jq -r .key` prints for a missing key (the command line reads it as None)."""
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("it served, with no key"))
    expect_cli_error(args, capsys, problem, "leave the flag out")


@pytest.mark.parametrize("args", [["--checkpoint", ""], ["--checkpoint= "], ["--CHECKPOINT", ""]])
def test_a_blank_checkpoint_flag_is_refused(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--checkpoint "$CKPT"` with CKPT unset served the shipped weights/ without a word."""
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("it served weights/"))
    expect_cli_error(args, capsys, "--checkpoint is blank", "leave the flag out")


def test_an_unusable_api_key_is_one_line_that_does_not_echo_it() -> None:
    result = run_cli("-m", "app", timeout=60, env=cli_env(APP_API_KEY="s3cret-clé"))
    assert_one_line_error(result, "APP_API_KEY", "ASCII")
    assert "s3cret" not in result.stdout + result.stderr


# ---- python -m app: a checkpoint that cannot be served ----------------------------------------


def linked_copy(artifact: Path, dest: Path) -> Path:
    """The artifact as a folder of symlinks to its shards and a copy of its model.json, so that
    one file can be broken without copying the others."""
    dest.mkdir()
    for path in artifact.iterdir():
        if path.name == INDEX_NAME:
            shutil.copy(path, dest / path.name)
        else:
            (dest / path.name).symlink_to(path)
    return dest


def smallest_shard(folder: Path) -> Path:
    files = json.loads((folder / INDEX_NAME).read_text())["files"]
    return folder / min(files, key=lambda name: files[name]["bytes"])


def replace_shard(folder: Path, change) -> str:
    shard = smallest_shard(folder)
    data = bytearray(shard.read_bytes())
    shard.unlink()
    new = change(data)
    if new is not None:
        shard.write_bytes(bytes(new))
    return shard.name


def flip_a_byte(data: bytearray) -> bytearray:
    data[len(data) // 2] ^= 0xFF
    return data


BROKEN_ARTIFACTS = [
    pytest.param(flip_a_byte, "sha256", id="tampered-shard"),
    pytest.param(lambda data: data[: len(data) // 2], "truncated", id="truncated-shard"),
    pytest.param(lambda data: None, "missing", id="missing-shard"),
]


def expect_cli_error(args: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    """`main(args)` (in process: the same code as `python -m app`, without a torch import per
    case) returns 2 with one `error:` line."""
    assert main([*args, "--device", "cpu"]) == 2
    completed = subprocess.CompletedProcess(args, 2, "", capsys.readouterr().err)
    return assert_one_line_error(completed, *fragments)


@pytest.mark.parametrize(("change", "fragment"), BROKEN_ARTIFACTS)
def test_a_broken_artifact_is_one_line(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change, fragment: str
) -> None:
    broken = linked_copy(artifact, tmp_path / "weights")
    name = replace_shard(broken, change)
    expect_cli_error(["--checkpoint", str(broken)], capsys, name, fragment)


def test_artifact_problems_in_model_json_are_one_line(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = linked_copy(artifact, tmp_path / "weights")
    index = folder / INDEX_NAME
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    expect_cli_error(["--checkpoint", str(folder)], capsys, "not valid JSON")
    index.write_text(json.dumps({**json.loads(text), "format_version": 99}))
    expect_cli_error(["--checkpoint", str(folder)], capsys, "version 99")
    incomplete = {k: v for k, v in json.loads(text).items() if k != "tensors"}
    index.write_text(json.dumps(incomplete))
    expect_cli_error(["--checkpoint", str(folder)], capsys, "lacks tensors")
    index.unlink()
    expect_cli_error(["--checkpoint", str(folder)], capsys, "no model.json")


def test_a_training_runs_folder_names_its_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--checkpoint runs/fast-.../` (the run, not its file) says which file to pass."""
    run = tmp_path / "fast-20261127-120000"
    run.mkdir()
    for name in ("best.pt", "last.pt", "metrics.jsonl"):
        (run / name).write_bytes(b"")
    expect_cli_error(
        ["--checkpoint", str(run)],
        capsys,
        "not an exported model folder but a training run's: pass "
        f"{run / 'best.pt'} or {run / 'last.pt'}",
    )


def test_a_bad_checkpoint_file_is_one_line(
    served_model: ServedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expect_cli_error(["--checkpoint", str(tmp_path / "missing.pt")], capsys, "does not exist")
    truncated = tmp_path / "last.pt"
    with open(served_model.checkpoint, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    expect_cli_error(["--checkpoint", str(truncated)], capsys, "not a readable checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 64)
    expect_cli_error(["--checkpoint", str(garbage)], capsys, "not a readable checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    expect_cli_error(["--checkpoint", str(foreign)], capsys, "not an alexnet-serve checkpoint")


@pytest.mark.slow
def test_python_m_app_refuses_a_broken_artifact_before_listening(
    artifact: Path, tmp_path: Path
) -> None:
    """The real command: exit 2, one line, no traceback, and never a server."""
    broken = linked_copy(artifact, tmp_path / "weights")
    name = replace_shard(broken, flip_a_byte)
    result = run_cli("-m", "app", "--checkpoint", broken, "--device", "cpu", timeout=120)
    assert_one_line_error(result, name, "sha256")
    assert "Uvicorn running" not in result.stderr + result.stdout
    missing = run_cli("-m", "app", "--checkpoint", tmp_path / "nothing", "--device", "cpu")
    assert_one_line_error(missing, "does not exist")


def test_an_unknown_app_variable_is_named_with_the_setting_it_resembles() -> None:
    from app.cli import unknown_variables

    lines = unknown_variables(
        {"APP_MAX_QUEU": "5", "APP_ENV": "prod", "APP_PORT": "8000", "HOME": "/root"}
    )
    assert lines == [
        "APP_ENV is not a setting of this service and is ignored",
        "APP_MAX_QUEU is not a setting of this service and is ignored; did you mean APP_MAX_QUEUE?",
    ]


def test_app_from_env_serves_what_the_app_variables_say(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The factory for running the service under another process manager
    (`uvicorn --factory app.main:app_from_env`): every setting from APP_*, none from flags."""
    from fastapi.testclient import TestClient

    from app.main import app_from_env
    from tests.app.conftest import wait_ready

    monkeypatch.setenv("APP_CHECKPOINT", str(artifact))
    monkeypatch.setenv("APP_DEVICE", "cpu")
    monkeypatch.setenv("APP_MAX_BATCH_SIZE", "3")
    with TestClient(app_from_env()) as client:
        wait_ready(client)
        assert client.get("/health").status_code == 200
        assert client.app.state.serving.settings.max_batch_size == 3  # type: ignore[attr-defined]


# ---- a stop before uvicorn takes over its signals ---------------------------------------------


@pytest.fixture
def cli_up_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """`main` with its model load, logging set-up and signal handlers stubbed out (this is
    pytest's process), a stop already noted, and `create_app` and `uvicorn.run` recording
    their calls in the list given."""
    import signal

    import app.main
    import app.predictor
    from app import cli, workers

    calls: list[tuple] = []
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the workers path sets variables
    monkeypatch.setattr(app.predictor, "load_predictor", lambda *args: "predictor")
    monkeypatch.setattr(app.main, "configure_logging", lambda level: None)

    def create_app(settings: Settings, predictor: str) -> str:
        calls.append(("create_app", {}))
        return "app"

    monkeypatch.setattr(app.main, "create_app", create_app)
    monkeypatch.setattr(workers, "note_stops", lambda: [signal.SIGTERM])
    monkeypatch.setattr(cli.uvicorn, "run", lambda target, **kwargs: calls.append((target, kwargs)))
    return calls


def test_a_stop_before_uvicorns_own_supervisor_ends_the_service(
    cli_up_to_uvicorn: list[tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where SO_REUSEPORT is missing, `--workers N` runs uvicorn's supervisor, which would
    never see a SIGTERM that came while the model loaded: the service started anyway."""
    from app import workers

    monkeypatch.setattr(workers, "supported", lambda: False)
    assert main(["--checkpoint", "weights", "--workers", "2"]) == 143
    assert cli_up_to_uvicorn == []


def test_uvicorns_own_supervisor_gets_the_guarded_protocol_by_class_path(
    cli_up_to_uvicorn: list[tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where SO_REUSEPORT is missing, `--workers N` ran uvicorn's own protocol: no limit on
    request headers, and the rest of a body answered early (413) read for as long as it came."""
    from uvicorn.importer import import_from_string

    from app import protocol, workers

    monkeypatch.setattr(workers, "supported", lambda: False)
    monkeypatch.setattr(workers, "note_stops", list)
    assert main(["--checkpoint", "weights", "--workers", "2", "--read-timeout-s", "3"]) == 0
    [(target, kwargs)] = cli_up_to_uvicorn
    assert target == "app.main:worker_app_from_env" and kwargs["workers"] == 2
    guarded = import_from_string(kwargs["http"])  # a path: uvicorn pickles it for each worker
    assert issubclass(guarded, protocol.GuardedHttpToolsProtocol)
    protocol._read_timeout_from_env.cache_clear()
    try:
        assert protocol._read_timeout_from_env() == 3.0  # from APP_*, as the workers see them
    finally:
        protocol._read_timeout_from_env.cache_clear()


def test_one_process_serves_the_app_built_before_uvicorn_unless_stopped(
    cli_up_to_uvicorn: list[tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app is built before uvicorn starts (an error in it keeps its traceback: uvicorn
    reports one raised inside a factory in a line); the factory uvicorn calls once its signal
    handlers are in place gives it, or ends the process for a stop noted before them."""
    from app import workers

    assert main(["--checkpoint", "weights"]) == 0
    (built, _), (factory, kwargs) = cli_up_to_uvicorn
    assert built == "create_app" and kwargs["factory"] is True
    with pytest.raises(SystemExit) as stopped:
        factory()
    assert stopped.value.code == 143
    monkeypatch.setattr(workers, "note_stops", list)  # no stop this time
    cli_up_to_uvicorn.clear()
    assert main(["--checkpoint", "weights"]) == 0
    _, (factory, _) = cli_up_to_uvicorn
    assert factory() == "app"
