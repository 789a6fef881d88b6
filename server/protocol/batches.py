"""`/v1/batches`: the request that creates a batch (the batch object is built in `server.batches`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from server.protocol.common import Wire, _Request

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]


class OutputExpiresAfter(_Request):
    PARAM_PREFIX = "output_expires_after."
    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=3600, le=2_592_000)]


class BatchCreate(_Request):
    input_file_id: str
    endpoint: Endpoint
    # OpenAI takes only 24h; how long that lasts here is --batch-window
    completion_window: Literal["24h"]
    metadata: Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                             Annotated[str, StringConstraints(max_length=512)]],
                        Field(max_length=16)] | None = None
    output_expires_after: OutputExpiresAfter | None = None


# ---------------------------------------------------------------------------------------- what is sent


class FileUpload(BaseModel):
    """`POST /v1/files`' multipart form (for the API's description: `api/files.py` reads the form)."""

    file: bytes
    purpose: Literal["batch", "user_data"]
    expires_after_anchor: Literal["created_at"] | None = Field(None, alias="expires_after[anchor]")
    expires_after_seconds: Annotated[int, Field(ge=3600, le=2_592_000)] | None = Field(None, alias="expires_after[seconds]")


class FileObject(Wire):
    KEEP_NULL = frozenset({"expires_at", "status_details"})
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: Literal["batch", "user_data", "batch_output"]
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class _Page(Wire):
    """A page of a list, in OpenAI's shape."""

    KEEP_NULL = frozenset({"first_id", "last_id"})
    object: Literal["list"] = "list"
    data: list[Any]  # each subclass names its objects
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, data: list[Any], more: bool) -> dict[str, Any]:
        """The page of `data` (objects with an `id`), as sent."""
        return cls(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                   has_more=more).model_dump()


class FileList(_Page):
    data: list[FileObject]


class FileDeleted(Wire):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchError(Wire):
    KEEP_NULL = frozenset({"param", "line"})
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(Wire):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(Wire):
    total: int
    completed: int
    failed: int


class InputTokensDetails(Wire):
    cached_tokens: int


class OutputTokensDetails(Wire):
    reasoning_tokens: int


class BatchUsage(Wire):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")


class Batch(Wire):
    KEEP_NULL = frozenset({"errors", "output_file_id", "error_file_id", "metadata", *TIMES})
    id: str
    object: Literal["batch"] = "batch"
    endpoint: Endpoint
    errors: BatchErrors | None
    input_file_id: str
    completion_window: Literal["24h"]
    status: Status
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None
    usage: BatchUsage


class BatchList(_Page):
    data: list[Batch]
