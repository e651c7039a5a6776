"""Input-line parsing and the output/error line formats of OpenAI's Batch API.

Input:  {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Output: {"id": "batch_req_...", "custom_id": "...", "response": {"status_code", "request_id",
        "body"}, "error": null}

A line that cannot be sent (bad JSON, wrong method or url, a body that is not an object) is
answered here, at validation, with the same `{"error": {...}}` object the interactive API uses
and status 400, so it lands in the error file beside the lines the server itself rejected.
Problems with the file as a whole (not UTF-8, no JSON object on any line, duplicate
custom_id, more lines than the server takes) fail the batch instead, with an `errors` list
naming the lines. Lines are split at "\n" only: a JSON string may hold U+2028 or U+0085,
which `str.splitlines` would break a line at. A leading UTF-8 byte order mark is dropped, as the
interactive API's JSON parser drops it. A `custom_id` that is not Unicode text (a lone surrogate
escape such as "\ud800") cannot be stored or written back: its line fails alone, at validation.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerserve.errors import APIError
from steerserve.batch.records import InputLine, LineResult

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_BLANK = " \t\r\f\v"  # a line of only these holds no request (the line counter agrees)
_REQUEST_LINE = re.compile(rb"^[ \t\r\f\v]*[^ \t\n\r\f\v]", re.MULTILINE)


def line_id(batch_id: str, index: int) -> str:
    """Stable per line, so an answer re-run after a crash keeps its id."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{index}".encode()).hexdigest()[:32]


def response_record(
    batch_id: str, index: int, custom_id: str | None, status_code: int, request_id: str, body: Any
) -> dict[str, Any]:
    return {
        "id": line_id(batch_id, index),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    }


def rejected_line(batch_id: str, index: int, custom_id: str | None, error: APIError) -> LineResult:
    record = response_record(batch_id, index, custom_id, int(error.status), line_id(batch_id, index), error.body())
    return LineResult(index=index, ok=False, record=record)


def engine_failure_line(batch_id: str, index: int, custom_id: str | None, attempts: int) -> LineResult:
    """A line the engine died on `attempts` times: recorded instead of being sent again."""
    error = APIError(
        f"the engine failed {attempts} times while running this line (it crashed or stopped each time), "
        "so the line is not sent again",
        code="engine_failure", status=500, type="server_error",
    )
    return rejected_line(batch_id, index, custom_id, error)


def expired_line(batch_id: str, index: int, custom_id: str | None) -> LineResult:
    """OpenAI's form for lines a batch could not reach before its completion window ended."""
    record = {
        "id": line_id(batch_id, index),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": "batch_expired",
                  "message": "This request could not be executed before the completion window expired."},
    }
    return LineResult(index=index, ok=False, record=record)


@dataclass
class ParsedInput:
    lines: list[InputLine] = field(default_factory=list)
    early_results: list[LineResult] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # non-empty: the batch fails


def _file_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def more_lines_than(data: bytes, limit: int) -> bool:
    """Whether `data` has more than `limit` non-blank lines, without parsing any: a newline count
    (in C) settles most files, and the scan for non-blank lines stops at line limit + 1."""
    if data.count(b"\n") < limit:
        return False
    return any(n >= limit for n, _ in enumerate(_REQUEST_LINE.finditer(data)))


def parse_input_file(path: Path, batch_id: str, endpoint: str, max_lines: int) -> ParsedInput:
    """Validate a JSONL input file on disk (parse_input, which the runner calls with the contents)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    return parse_input(data, batch_id, endpoint, max_lines)


def parse_input(data: bytes | None, batch_id: str, endpoint: str, max_lines: int) -> ParsedInput:
    """Validate a JSONL input file's contents (None: the file is gone). Line numbers in messages
    and `errors` are 1-based."""
    parsed = ParsedInput()
    if data is None:
        parsed.errors.append(_file_error("file_not_found", "the input file no longer exists"))
        return parsed
    if more_lines_than(data, max_lines):
        parsed.errors.append(_file_error(
            "too_many_lines", f"the input file has more than {max_lines} requests, the most one batch takes "
            "on this server; split it into several batches"))
        return parsed
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        parsed.errors.append(_file_error(
            "invalid_file_format", f"the input file is not UTF-8 text (byte {exc.start}); expected JSONL"))
        return parsed
    seen: dict[str, int] = {}
    objects = 0
    index = 0
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip(_BLANK):
            continue
        line, result, is_object = _parse_line(raw, number, index, batch_id, endpoint)
        objects += is_object
        if line.custom_id is not None:
            if line.custom_id in seen:
                parsed.errors.append(_file_error(
                    "duplicate_custom_id",
                    f"custom_id {line.custom_id!r} on line {number} was already used on line "
                    f"{seen[line.custom_id]}; custom_id values must be unique within a batch",
                    line=number, param="custom_id",
                ))
            else:
                seen[line.custom_id] = number
        parsed.lines.append(line)
        if result is not None:
            parsed.early_results.append(result)
        index += 1
    if not parsed.lines:
        parsed.errors.append(_file_error("empty_file", "the input file has no requests"))
    elif objects == 0:
        parsed.errors.append(_file_error(
            "invalid_file_format",
            "the input file is not JSONL: no line is a JSON object "
            "(expected one {\"custom_id\", \"method\", \"url\", \"body\"} object per line)",
        ))
    return parsed


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parse_line(
    raw: str, number: int, index: int, batch_id: str, endpoint: str
) -> tuple[InputLine, LineResult | None, bool]:
    """(line, its early error result or None, whether the line is a JSON object)."""

    def reject(custom_id: str | None, message: str, param: str | None, code: str):
        error = APIError(f"line {number}: {message}", param=param, code=code)
        return InputLine(index, custom_id, None, None), rejected_line(batch_id, index, custom_id, error)

    try:
        data = json.loads(raw)
    except ValueError as exc:
        return (*reject(None, f"not valid JSON ({exc})", None, "invalid_json"), False)
    if not isinstance(data, dict):
        return (*reject(None, "expected a JSON object", None, "invalid_json"), False)
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return (*reject(None, "custom_id must be a non-empty string", "custom_id", "invalid_custom_id"), True)
    if not _is_text(custom_id):
        return (*reject(None, f"custom_id {ascii(custom_id)} is not Unicode text (it holds a lone surrogate), so it "
                        "cannot be stored or returned", "custom_id", "invalid_custom_id"), True)
    method = data.get("method")
    if method != "POST":
        return (*reject(custom_id, f"method must be 'POST', got {method!r}", "method", "invalid_method"), True)
    url = data.get("url")
    if url != endpoint:
        return (*reject(custom_id, f"url {url!r} does not match the batch's endpoint {endpoint!r}", "url",
                        "invalid_url"), True)
    body = data.get("body")
    if not isinstance(body, dict):
        return (*reject(custom_id, "body must be a JSON object", "body", "invalid_body"), True)
    if body.get("stream"):
        return (*reject(custom_id, "streaming is not supported in a batch; remove body.stream", "body.stream",
                        "invalid_body"), True)
    return InputLine(index, custom_id, url, json.dumps(body)), None, True
