"""Pydantic models of the wire objects: request bodies are parsed with them, and they document
the responses in the OpenAPI document (responses themselves are serialized with orjson)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ExpiresAfter(BaseModel):
    anchor: str
    seconds: int


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None
    output_expires_after: dict[str, Any] | None = None


class CreateUploadRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    filename: str
    purpose: str
    bytes: int
    mime_type: str
    expires_after: ExpiresAfter | None = None


class CompleteUploadRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    part_ids: list[str]
    md5: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None
    # An extension, only in answers to an admin key: whose object this is (the SDK ignores it).
    owner: str | None = Field(default=None, description="The owning API key's tenant; only for admin callers.")


class Upload(BaseModel):
    id: str
    object: Literal["upload"]
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileObject | None


class UploadPart(BaseModel):
    id: str
    object: Literal["upload.part"]
    created_at: int
    upload_id: str


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(BaseModel):
    code: str | None
    message: str | None
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: BatchUsage | None
    metadata: dict[str, str] | None
    # An extension, only in answers to an admin key: whose object this is (the SDK ignores it).
    owner: str | None = Field(default=None, description="The owning API key's tenant; only for admin callers.")
    # overnight's extensions (the official SDK keeps extra fields on its Batch model):
    outcome: BatchOutcome | None = Field(
        None, description="overnight: what a finished batch came to (null until it finishes)."
    )
    deadline_warning: str | None = Field(
        None, description="overnight: set while a running batch, at its pace so far, will not finish in its window."
    )
    retry_of: str | None = Field(None, description="overnight: the batch whose failed lines this batch re-runs.")
    # overnight's extensions: null unless the batch is in_progress.
    throughput: float | None = Field(None, description="Lines per second over the last minute (in_progress only)")
    eta_seconds: float | None = Field(None, description="Seconds until done at that rate (in_progress only)")


class BatchOutcome(BaseModel):
    completed: int
    failed: int
    errors_by_code: dict[str, int] = Field(description="error-file lines by error code")


class RetryBatchRequest(BaseModel):
    include: list[Literal["failed", "cancelled", "expired"]] = Field(
        default=["failed"],
        description="which error lines to run again: failed (errors from the engine), cancelled, expired",
    )


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DownloadLink(BaseModel):
    object: Literal["file.download_link"]
    file_id: str
    url: str  # a path on this server: GET it without an Authorization header before expires_at
    expires_at: int


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class LimiterState(BaseModel):
    minimum: int
    maximum: int
    limit: int = Field(description="The adaptive window now (additive increase, halved on overload).")
    ceiling: int = Field(description="This process's share of `maximum` (workers split it).")
    in_flight: int
    peak_in_flight: int


class EngineInfo(BaseModel):
    name: str
    kind: str
    owned_by: str
    models: list[str]
    concurrency: LimiterState | None = Field(description="An upstream's limiter, as this process holds it.")


class RouteInfo(BaseModel):
    pattern: str
    engine: str
    endpoints: list[str] | None


class ModelQueueInfo(BaseModel):
    model: str | None
    batches: int = Field(description="Unfinished batches (validating, in_progress, finalizing, cancelling).")
    waiting_requests: int = Field(description="Their requests not answered yet.")


class WorkerInfo(BaseModel):
    id: str
    started_at: float
    last_seen: float
    seen_seconds_ago: float


class ServerOverview(BaseModel):
    object: Literal["server"]
    owner: str = Field(description="The calling admin key's own owner id (its own files and batches carry it)")
    engines: list[EngineInfo]
    routes: list[RouteInfo]
    queue: list[ModelQueueInfo]
    workers: list[WorkerInfo]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Not found (or owned by another API key)",
        409: "Conflict",
        413: "Payload too large",
    }.items()
}
