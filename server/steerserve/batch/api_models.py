"""Request and response models of the Files and Batches API: OpenAI's objects, as /openapi.json
publishes them. The handlers (files_api.py, batches_api.py) validate against these and return
them; the store's records (store.py) produce the same fields in the same order."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from steerserve.routers.route import integer_query

UploadPurpose = Literal["batch", "user_data", "assistants", "fine-tune", "vision", "evals"]
UPLOAD_PURPOSES: tuple[str, ...] = get_args(UploadPurpose)
MAX_FILE_LIST_LIMIT = 10_000
BATCH_LIST_LIMIT, MAX_BATCH_LIST_LIMIT = 20, 100
BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]


class CreateBatch(BaseModel):
    """The body of POST /v1/batches (unknown keys are ignored, as new OpenAI clients may send more)."""

    model_config = ConfigDict(extra="ignore")
    input_file_id: str = Field(min_length=1, description="an uploaded file with purpose 'batch'")
    endpoint: str = Field(description="the route every line is sent to: /v1/chat/completions or /v1/completions")
    completion_window: str = Field(description="hours the batch may take, like '24h' (1h to 168h)",
                                   json_schema_extra={"pattern": "^[0-9]{1,4}h$"})
    metadata: dict[str, str] | None = Field(None, description="at most 16 pairs; keys up to 64 characters, "
                                                              "values up to 512")

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > 16:
                raise ValueError("at most 16 metadata pairs")
            if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
                raise ValueError("metadata keys have at most 64 characters and values at most 512")
        return value


class FileListQuery(BaseModel):
    purpose: str | None = None
    after: str | None = Field(None, description="list the files after this file id (cursor)")
    # read by the handler, whose 400 names the value sent
    order: Annotated[str | None, WithJsonSchema({"type": "string", "enum": ["asc", "desc"]})] = Field(
        None, description="default: desc (newest first)")
    limit: integer_query(1, MAX_FILE_LIST_LIMIT, MAX_FILE_LIST_LIMIT) = None


class BatchListQuery(BaseModel):
    after: str | None = Field(None, description="list the batches after this batch id (cursor)")
    limit: integer_query(1, MAX_BATCH_LIST_LIMIT, BATCH_LIST_LIMIT) = None


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str  # an upload's purpose, or "batch_output" for what a batch wrote
    status: str
    expires_at: int | None
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
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
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None
