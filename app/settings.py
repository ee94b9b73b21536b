"""Every setting of the service: a CLI flag and an APP_* environment variable, typed, validated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.limits import PIL_PIXEL_LIMIT
from training.cpus import available_cpus
from training.device_names import CUDA_DEVICE

_DEVICE = re.compile(rf"^(auto|cpu|{CUDA_DEVICE})$")


def setting(default: Any, description: str, **kwargs: Any) -> Any:
    return Field(default, description=description, **kwargs)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APP_",
        cli_prog_name="python -m app",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,  # "--threads int", not "--threads {int,null}"
        cli_exit_on_error=False,  # a mistyped flag: our one-line error, not argparse's usage
        extra="ignore",
        # Empty is unset: Compose passes ${APP_THREADS:-} through as an empty string.
        env_ignore_empty=True,
    )

    checkpoint: Path = setting(
        Path("weights"), "exported model folder (weights/) or a training checkpoint file (last.pt)"
    )
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto", "auto: bf16 on CUDA; on CPU whichever of fp32/bf16 runs faster at warm-up"
    )
    host: str = setting("127.0.0.1", "interface to listen on (0.0.0.0 in a container)")
    port: int = setting(8000, "TCP port", ge=1, le=65535)
    max_batch_size: int = setting(32, "images per forward pass, at most", ge=1, le=1024)
    max_batch_delay_ms: float = setting(
        2.0,
        "a batch closes at most this long after its first image; at once when full, or when "
        "no other request is on its way",
        ge=0,
        le=1000,
    )
    max_queue: int = setting(
        256, "images waiting for the model; beyond it: 503 + Retry-After", ge=1
    )
    request_timeout_s: float = setting(
        10.0,
        "a request not answered within this (decoding, queue, model) gets 504",
        gt=0,
        allow_inf_nan=False,  # a deadline; inf was accepted and shown as null by /model
    )
    read_timeout_s: float = setting(
        10.0,
        "a client that takes longer to send its request headers, or pauses this long while "
        "sending a body, gets 408 and is disconnected",
        gt=0,
        allow_inf_nan=False,
    )
    max_upload_bytes: int = setting(
        10 * 1024 * 1024,
        "largest request body in bytes; larger: 413, the body never buffered",
        ge=1024,
    )
    max_image_pixels: int = setting(
        25_000_000,
        "largest image (width x height) decoded; larger: 413",
        ge=1,
        le=PIL_PIXEL_LIMIT,  # Pillow refuses larger images whatever this says
    )
    max_batch_files: int = setting(
        32,
        "most files in one /predict/batch call",
        ge=1,
        le=1000,  # the form parser's limit
    )
    api_key: SecretStr | None = setting(
        None, "when set, /predict and /predict/batch need it in the X-API-Key header"
    )
    workers: int = setting(1, "server processes (each loads its own model copy)", ge=1)
    threads: int | None = setting(
        None,
        "CPU threads per process for the model (default: the CPUs this process may use, a "
        "container's quota included, / workers)",
        ge=1,
    )
    decode_threads: int | None = setting(
        None,
        "threads per process that decode uploads (default: one per available CPU); they share the "
        "process's Python interpreter lock with HTTP handling and the model's thread",
        ge=1,
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = setting(
        "info", "log level"
    )
    graceful_shutdown_s: float = setting(
        30.0,
        "on SIGTERM, time allowed for in-flight requests",
        ge=0,
        # A day at most: beyond threading's and multiprocessing's timeouts (9.2e9 s, 2.1e6 s),
        # the shutdown crashed with an OverflowError; inf crashed the start-up.
        le=86400,
        allow_inf_nan=False,
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # Stripped as HTTP strips header values: a key read from a file keeps no newline.
        key = value.get_secret_value().strip() if value is not None else ""
        if not key.isascii():
            # HTTP carries header values as bytes, which the server reads as Latin-1: a key
            # with other characters could never be matched.
            raise ValueError("use ASCII characters only (an HTTP header carries the key)")
        return SecretStr(key) if key else None

    def torch_threads(self) -> int:
        return self.threads or max(1, available_cpus() // self.workers)

    def decoder_threads(self) -> int:
        return self.decode_threads or available_cpus()

    def env(self) -> dict[str, str]:
        """These settings as APP_* variables (for worker processes that rebuild them)."""
        out = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[f"APP_{name.upper()}"] = str(value)
        return out


# --help names each flag's environment variable too.
for _name, _field in Settings.model_fields.items():
    _field.description = f"{_field.description} [env APP_{_name.upper()}]"
Settings.model_rebuild(force=True)
