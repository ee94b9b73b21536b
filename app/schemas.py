"""Response bodies: every endpoint answers one of these pydantic models (see /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ClassScore(BaseModel):
    label: str = Field(examples=["cat"])
    class_id: int = Field(examples=[3])
    probability: float = Field(examples=[0.91])


class Prediction(BaseModel):
    label: str = Field(description="the most likely class", examples=["cat"])
    class_id: int = Field(description="its index in /model's classes", examples=[3])
    confidence: float = Field(description="its probability, 0..1", examples=[0.91])
    top_k: list[ClassScore] = Field(description="the k most likely classes, most likely first")


class ErrorBody(BaseModel):
    error: str = Field(description="a stable machine-readable code", examples=["not_an_image"])
    detail: str = Field(description="what was wrong and what to do")


class BatchItem(BaseModel):
    index: int = Field(description="position of the file in the upload")
    filename: str | None = None
    prediction: Prediction | None = None
    error: ErrorBody | None = Field(None, description="set instead of prediction for a bad file")


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="one entry per uploaded file, in upload order")


class ModelIdentity(BaseModel):
    architecture: str
    sha256: str = Field(description="checksum of the served checkpoint (model.json for an export)")
    recipe: str | None
    test_accuracy: float | None = Field(description="recorded top-1 test accuracy, percent")


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    device: str | None = None
    precision: str | None = None
    model: ModelIdentity | None = None
    detail: str | None = None


class Accuracy(BaseModel):
    test: float | None = Field(
        description="top-1 on the test set, percent, of what is served (null: not measured)"
    )
    test_per_class: dict[str, float] | None
    validation: float | None = Field(
        description="validation accuracy of the served weights, after their epoch"
    )
    best_validation: dict[str, Any] | None
    checkpoint_test: float | None = Field(
        description="the full-precision checkpoint's test accuracy"
    )


class Batching(BaseModel):
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    request_timeout_s: float


class ModelInfo(BaseModel):
    # `model_args` is the checkpoint's own key; pydantic before 2.10 reserved the `model_`
    # prefix and warned about it at import.
    model_config = ConfigDict(protected_namespaces=())

    architecture: str
    model_args: dict[str, Any]
    classes: list[str]
    input_size: int = Field(description="pixels per side fed to the network")
    source_size: int = Field(
        description="every upload is first reduced to this many pixels per side"
    )
    preprocessing: dict[str, Any]
    accuracy: Accuracy
    recipe: str | None
    epochs: int | None
    checkpoint: str = Field(description="file or folder name of what is served")
    checkpoint_format: Literal["artifact", "training-checkpoint"]
    sha256: str
    quantization: str | None
    device: str
    precision: str
    warmup: dict[str, Any]
    batching: Batching
