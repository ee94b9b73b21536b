"""Endpoints: predictions (API key when configured) and operations (health, model, metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as FormFile

from app.batching import DeadlineExceeded, DynamicBatcher, QueueFull, Ticket
from app.decoding import ImageError, decode_upload
from app.schemas import (
    Accuracy,
    Batching,
    BatchItem,
    BatchResponse,
    ClassScore,
    ErrorBody,
    Health,
    ModelIdentity,
    ModelInfo,
    Prediction,
)
from app.state import APIError, ServingState

T = TypeVar("T")

ERRORS = {
    400: {"model": ErrorBody, "description": "empty/truncated/corrupt image; cut-short multipart"},
    401: {"model": ErrorBody, "description": "API key required (X-API-Key) or wrong"},
    413: {"model": ErrorBody, "description": "body over the upload limit; too many pixels, files"},
    415: {"model": ErrorBody, "description": "not an image, or an unsupported format"},
    422: {
        "model": ErrorBody,
        "description": "no file in field 'file'/'files', text beside it, bad top_k",
    },
    503: {
        "model": ErrorBody,
        "description": "model not ready, queue full, or shutting down (see Retry-After)",
    },
    504: {"model": ErrorBody, "description": "no result within the request timeout"},
}


# Dependencies and endpoints that never block are `async def`: FastAPI would run a plain `def`
# in its thread pool, a thread round trip per dependency and request for no blocking work.


async def serving(request: Request) -> ServingState:
    return request.app.state.serving


State = Annotated[ServingState, Depends(serving)]
TopK = Annotated[int, Query(ge=1, le=10, description="how many classes to return, 1..10")]
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="set APP_API_KEY to require it"
)


async def require_api_key(
    state: State, key: Annotated[str | None, Depends(_api_key_header)]
) -> None:
    expected = state.settings.api_key
    if expected is None:
        return
    # Stripped as the key is (Settings): whitespace around a header value is not part of it.
    if key is None or not secrets.compare_digest(
        key.strip().encode(), expected.get_secret_value().encode()
    ):
        raise APIError(
            401,
            "unauthorized",
            "missing or wrong API key: send it in the X-API-Key header",
            {"WWW-Authenticate": "X-API-Key"},
        )


STATIC_DIR = Path(__file__).parent / "static"

predictions = APIRouter(
    tags=["predictions"], dependencies=[Depends(require_api_key)], responses=ERRORS
)
ops = APIRouter(tags=["operations"])
page = APIRouter(include_in_schema=False)


@page.get("/")
def index() -> FileResponse:
    """A page for people: choose or drop images, see the top classes (app/static/)."""
    return FileResponse(STATIC_DIR / "index.html")


def to_prediction(probs: torch.Tensor, classes: list[str], k: int) -> Prediction:
    # One number per class (ten for CIFAR-10): for so few, plain Python sorts faster than a
    # tensor op on the event loop. The sort is stable, so exact ties (common in bf16) go to the
    # lower class id, as argmax does: the served label is then the one offline evaluation
    # (training.engine) reports.
    values = probs.tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])[:k]
    top = [ClassScore(label=classes[i], class_id=i, probability=round(values[i], 6)) for i in order]
    return Prediction(
        label=top[0].label, class_id=top[0].class_id, confidence=top[0].probability, top_k=top
    )


def text_beside_uploads(form: FormData) -> APIError | None:
    """A file field ('file' or 'files') holding a text value as well as files: /predict read
    whichever came last, ignoring the text or saying "no file"; refused either way."""
    for field in ("file", "files"):
        values = form.getlist(field)
        texts = sum(isinstance(v, str) for v in values)
        if 0 < texts < len(values):
            return APIError(
                422,
                "not_a_file",
                f"field '{field}' holds {texts} text value(s) beside its file upload(s): send "
                "only files in it",
            )
    return None


async def _only_uploads_in(request: Request, field: str, at_most: int | None = None) -> None:
    """The form parser keeps every part, the endpoint's parameter only those of its own field
    (one, for /predict): answer part of an upload and the client never learns the rest was
    dropped. So files in another field, or several where one is read, are a 422."""
    form = await request.form()  # the form FastAPI already parsed
    if (mixed := text_beside_uploads(form)) is not None:
        raise mixed
    uploads = [key for key, value in form.multi_items() if isinstance(value, FormFile)]
    others = sorted(set(uploads) - {field})
    if others:
        raise APIError(
            422,
            "unexpected_field",
            f"files in field {', '.join(repr(o) for o in others)}; this endpoint reads only "
            f"field '{field}' (/predict takes 'file', /predict/batch 'files')",
        )
    sent = uploads.count(field)
    if at_most is not None and sent > at_most:
        raise APIError(
            422,
            "too_many_files",
            f"{sent} files in field '{field}'; /predict classifies one: send several to "
            "/predict/batch, in field 'files'",
        )


def _too_late(state: ServingState) -> APIError:
    timeout = state.settings.request_timeout_s
    return APIError(504, "timeout", f"the prediction took too long: no result within {timeout:g} s")


def _timed_decode(state: ServingState, data: bytes, size: int, deadline: float) -> torch.Tensor:
    if time.monotonic() > deadline:  # waited behind other uploads past the request's deadline
        raise _too_late(state)
    with state.metrics.decode_seconds.time():  # in the worker thread: the decoding alone
        return decode_upload(data, max_pixels=state.settings.max_image_pixels, size=size)


async def _decode(
    state: ServingState, upload: UploadFile, size: int, deadline: float
) -> torch.Tensor:
    """The upload as the 32x32 tensor training used, decoded off the event loop, within the
    request's deadline (APP_REQUEST_TIMEOUT_S covers decoding too)."""
    data = await upload.read()
    loop = asyncio.get_running_loop()
    work = loop.run_in_executor(state.decoders, _timed_decode, state, data, size, deadline)
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise _too_late(state) from None
    except ImageError as exc:
        state.metrics.image_errors.labels(exc.code).inc()
        raise


async def _infer(
    state: ServingState,
    batcher: DynamicBatcher,
    images: list[torch.Tensor],
    ticket: Ticket,
    deadline: float,
) -> list[torch.Tensor]:
    if not images:  # every file of a batch was refused: their errors are the answer
        return []
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _too_late(state)
    try:
        probs = await batcher.predict(images, remaining, ticket)
    except QueueFull as exc:
        raise APIError(
            503, "busy", f"the server is busy: {exc}; retry shortly", {"Retry-After": "1"}
        ) from None
    except DeadlineExceeded:
        raise _too_late(state) from None
    state.metrics.images.inc(len(images))
    return probs


CLIENT_GONE = 499  # nginx's code for "the client closed the connection first"; in /metrics only


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up. Called once the body is read: what the server then
    receives for this request is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _while_connected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`work`, cancelled if its client disconnects first: Starlette does not cancel a handler
    whose client left, so images of clients long gone were still decoded and run through the
    model, ahead of clients still waiting. Cancelled, they leave the queue unrun."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler cancelled (a forced shutdown): its work goes too
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(CLIENT_GONE, "client_gone", "the client closed the connection")
    return task.result()


@predictions.post("/predict", response_model=Prediction, summary="Classify one image")
async def predict(
    request: Request,
    state: State,
    file: Annotated[
        UploadFile,
        File(
            description="one image: JPEG, PNG, WebP, BMP or GIF, any size up to the service's "
            "upload and pixel limits (413 beyond them)"
        ),
    ],
    top_k: TopK = 5,
) -> Prediction:
    await _only_uploads_in(request, "file", at_most=1)
    predictor, batcher = state.require_ready()
    deadline = time.monotonic() + state.settings.request_timeout_s

    async def classify() -> torch.Tensor:
        with batcher.incoming() as ticket:
            try:
                image = await _decode(state, file, predictor.source_size, deadline)
            except ImageError as exc:
                raise APIError(exc.status, exc.code, exc.detail) from None
            [probs] = await _infer(state, batcher, [image], ticket, deadline)
        return probs

    probs = await _while_connected(request, classify())
    return to_prediction(probs, predictor.classes, top_k)


@predictions.post(
    "/predict/batch",
    response_model=BatchResponse,
    summary="Classify several images; a bad file gets an error in its slot",
)
async def predict_batch(
    request: Request,
    state: State,
    files: Annotated[list[UploadFile], File(description="1..max_batch_files images")],
    top_k: TopK = 5,
) -> BatchResponse:
    await _only_uploads_in(request, "files")
    predictor, batcher = state.require_ready()
    limit = state.settings.max_batch_files
    if len(files) > limit:
        raise APIError(
            413,
            "too_many_files",
            f"{len(files)} files sent; at most {limit} per call (APP_MAX_BATCH_FILES)",
        )
    if len(files) > batcher.max_queue:  # would never fit: a 503 'retry' could not succeed
        raise APIError(
            413,
            "too_many_files",
            f"{len(files)} files sent; the queue holds {batcher.max_queue} images "
            "(APP_MAX_QUEUE): send fewer per call",
        )
    deadline = time.monotonic() + state.settings.request_timeout_s

    async def classify() -> tuple[list[Any], list[int], list[torch.Tensor]]:
        with batcher.incoming() as ticket:
            decoded = await asyncio.gather(
                *(_decode(state, f, predictor.source_size, deadline) for f in files),
                return_exceptions=True,
            )
            for result in decoded:
                if isinstance(result, BaseException) and not isinstance(result, ImageError):
                    raise result
            good = [i for i, r in enumerate(decoded) if isinstance(r, torch.Tensor)]
            probs = await _infer(state, batcher, [decoded[i] for i in good], ticket, deadline)
        return decoded, good, probs

    decoded, good, probs = await _while_connected(request, classify())
    by_index = dict(zip(good, probs, strict=True))
    results = []
    for i, (upload, result) in enumerate(zip(files, decoded, strict=True)):
        item = BatchItem(index=i, filename=upload.filename)
        if isinstance(result, ImageError):
            item.error = ErrorBody(error=result.code, detail=result.detail)
        else:
            item.prediction = to_prediction(by_index[i], predictor.classes, top_k)
        results.append(item)
    return BatchResponse(results=results)


def _identity(state: ServingState) -> ModelIdentity | None:
    if state.predictor is None:
        return None
    info = state.predictor.loaded.info
    return ModelIdentity(
        architecture=info["architecture"],
        sha256=info["sha256"],
        recipe=info.get("recipe"),
        test_accuracy=info.get("test_accuracy"),
    )


@ops.get(
    "/health",
    response_model=Health,
    summary="200 once the model is loaded and warmed up; 503 before, or if it failed",
    responses={503: {"model": Health}},
)
async def health(state: State, response: Response) -> Health:
    if state.status != "ok":
        response.status_code = 503
    predictor = state.predictor
    return Health(
        status=state.status,  # type: ignore[arg-type]
        device=str(predictor.device) if predictor else None,
        precision=predictor.precision if predictor and state.status == "ok" else None,
        model=_identity(state),
        detail=state.detail,
    )


@ops.get(
    "/model",
    response_model=ModelInfo,
    summary="What is served, and how",
    responses={503: {"model": ErrorBody}},
)
async def model_info(state: State) -> ModelInfo:
    predictor, _ = state.require_ready()
    info, loaded, s = predictor.loaded.info, predictor.loaded, state.settings
    return ModelInfo(
        architecture=info["architecture"],
        model_args=info["model_args"],
        classes=loaded.classes,
        input_size=loaded.preprocessing.input_size,
        source_size=loaded.preprocessing.source_size,
        preprocessing=loaded.preprocessing.to_dict(),
        accuracy=Accuracy(
            test=info.get("test_accuracy"),
            test_per_class=info.get("test_per_class"),
            validation=info.get("validation_accuracy"),
            best_validation=info.get("best_validation"),
            checkpoint_test=info.get("checkpoint_test_accuracy"),
        ),
        recipe=info.get("recipe"),
        epochs=info.get("epoch"),
        checkpoint=Path(info["path"]).name,
        checkpoint_format=info["format"],
        sha256=info["sha256"],
        quantization=info.get("quantization"),
        device=str(predictor.device),
        precision=predictor.precision,
        warmup=predictor.warmup_report,
        batching=Batching(
            max_batch_size=s.max_batch_size,
            max_batch_delay_ms=s.max_batch_delay_ms,
            max_queue=s.max_queue,
            request_timeout_s=s.request_timeout_s,
        ),
    )


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# Some monitors and load balancers probe with HEAD: the same answer, without a body.
for _path, _endpoint in (("/health", health), ("/model", model_info), ("/metrics", metrics)):
    ops.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)
page.add_api_route("/", index, methods=["HEAD"], include_in_schema=False)
