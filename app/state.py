"""The service's state shared by the routes: settings, metrics, model, batcher, readiness."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from app.batching import DynamicBatcher
from app.metrics import Metrics
from app.predictor import Predictor, load_predictor
from app.settings import Settings
from training.errors import UserError

log = logging.getLogger("app")


class APIError(Exception):
    """An error answered as JSON {"error": code, "detail": message} with an HTTP status."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def _public(exc: Exception, settings: Settings) -> str:
    """A load failure as /health tells it to clients: a checkpoint problem's message with the
    server's path cut to the checkpoint's name; anything else by type only (the log has it)."""
    if isinstance(exc, UserError):
        checkpoint = Path(settings.checkpoint)
        return str(exc).replace(str(checkpoint), checkpoint.name)
    return f"{type(exc).__name__}; the server log has the details"


class ServingState:
    """What the routes need: settings, metrics, and (once ready) the predictor and batcher."""

    def __init__(self, settings: Settings, predictor: Predictor | None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.predictor = predictor
        self.batcher: DynamicBatcher | None = None
        self.status = "loading"
        self.detail: str | None = "loading the model"
        self.ready = threading.Event()  # set once ok or failed
        # Uploads decode here, off the event loop. A fixed pool, one thread per core unless
        # --decode-threads says otherwise: decoding is CPU work (PIL releases the GIL while it
        # decodes), and Starlette's default pool (anyio's, up to 40 threads) started new
        # threads on the event loop as load rose.
        self.decoders = ThreadPoolExecutor(
            max_workers=settings.decoder_threads(), thread_name_prefix="decode"
        )

    def load_and_warm_up(self) -> None:
        s = self.settings
        # Several processes on one CPU share its cores instead of all fighting for all of them.
        torch.set_num_threads(s.torch_threads())
        try:
            if self.predictor is None:
                self.predictor = load_predictor(s.checkpoint, s.device, s.precision)
            choose = s.precision == "auto" and self.predictor.device.type == "cpu"
            self.predictor.warm_up(s.max_batch_size, choose_precision=choose)
            self.batcher = DynamicBatcher(
                self.predictor.predict,
                max_batch_size=s.max_batch_size,
                max_batch_delay_s=s.max_batch_delay_ms / 1000,
                max_queue=s.max_queue,
                metrics=self.metrics,
            )
            self.batcher.start()
            self.status, self.detail = "ok", None
            log.info(
                "serving %s on %s (%s); %s",
                Path(s.checkpoint).name, self.predictor.device, self.predictor.precision,
                # Said every start: a key that was meant but came blank is seen here.
                "predictions need X-API-Key" if s.api_key else "no API key (APP_API_KEY) needed",
            )  # fmt: skip
        except Exception as exc:  # reported by /health; the process stays up for probes
            log.error("model failed to load: %s", exc)
            self.status, self.detail = "failed", f"model failed to load: {_public(exc, s)}"
        finally:
            self.ready.set()

    def require_ready(self) -> tuple[Predictor, DynamicBatcher]:
        if self.status != "ok" or self.predictor is None or self.batcher is None:
            raise APIError(
                503, "not_ready", self.detail or "the model is not ready", {"Retry-After": "5"}
            )
        return self.predictor, self.batcher
