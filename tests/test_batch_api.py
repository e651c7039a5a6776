"""Files + Batches API on the shared server, through the official openai client.

Each test waits for its batches to end, so no batch line is still running when another test
file measures metrics or timing on the same server.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.conftest import MODEL_NAME, PROMPT

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "cancelled", "expired")
OTHER_PROMPT = [{"role": "user", "content": "Please write a short poem about the sea."}]


def chat_body(messages=PROMPT, steering=None, max_tokens=12, **extra):
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True, **extra}
    if steering is not None:
        body["steering"] = steering
    return body


def request_line(custom_id, body, url=CHAT):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(client, lines, purpose="batch"):
    content = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"
    return client.files.create(file=("requests.jsonl", content), purpose=purpose)


def wait(client, batch_id, timeout=300, until=TERMINAL):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")


def lines_of(client, file_id):
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def submit(client, lines, endpoint=CHAT, **kwargs):
    f = upload(client, lines)
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kwargs)


def add(layer, index, value, **more):
    return {"features": [{"layer": layer, "index": index, "mode": "add", "value": value}], **more}


BAD_STEERING = add(3, 1, 2.0)  # no SAE at layer 3


def test_mixed_batch_equals_interactive_requests(client, http):
    good = {
        "plain": chat_body(),
        "plain-other": chat_body(OTHER_PROMPT),
        "add": chat_body(steering=add(1, 3, 8.0)),
        "add-negative-other": chat_body(OTHER_PROMPT, steering=add(1, 5, -6.0)),
        "clamp-generation": chat_body(steering={"features": [{"layer": 2, "index": 9, "mode": "clamp", "value": 20.0}],
                                               "apply_to": "generation"}),
        "two-layers": chat_body(steering={"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8},
                                                       {"layer": 2, "index": 11, "mode": "add", "value": 6}]}),
    }
    lines = [request_line(cid, body) for cid, body in good.items()]
    lines += [
        request_line("bad-steering", chat_body(steering=BAD_STEERING)),
        request_line("bad-url", chat_body(), url="/v1/embeddings"),
        "{this is not json",
    ]
    batch = submit(client, lines, metadata={"purpose": "test"})
    assert batch.status == "validating" and batch.metadata == {"purpose": "test"}
    batch = wait(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 9, "completed": 6, "failed": 3}
    assert batch.completed_at >= batch.finalizing_at >= batch.in_progress_at >= batch.created_at

    outputs = {o["custom_id"]: o for o in lines_of(client, batch.output_file_id)}
    assert sorted(outputs) == sorted(good)
    for custom_id, body in good.items():
        out = outputs[custom_id]
        assert out["error"] is None and out["response"]["status_code"] == 200
        assert out["id"].startswith("batch_req_") and out["response"]["request_id"]
        batched = out["response"]["body"]
        alone = http.post(CHAT, json=body).json()
        assert [c["token_ids"] for c in batched["choices"]] == [c["token_ids"] for c in alone["choices"]], custom_id
        assert batched.get("steering") == alone.get("steering"), custom_id
        assert ("steering" in batched) == ("steering" in body)

    errors = {e["custom_id"]: e for e in lines_of(client, batch.error_file_id)}
    assert sorted(errors, key=str) == sorted(["bad-steering", "bad-url", None], key=str)
    interactive = http.post(CHAT, json=chat_body(steering=BAD_STEERING))
    assert interactive.status_code == 400
    assert errors["bad-steering"]["response"]["status_code"] == 400
    assert errors["bad-steering"]["response"]["body"] == interactive.json()
    assert errors["bad-steering"]["error"] is None
    assert errors["bad-url"]["response"]["body"]["error"]["code"] == "invalid_url"
    assert errors["bad-url"]["response"]["body"]["error"]["param"] == "url"
    assert errors[None]["response"]["body"]["error"]["code"] == "invalid_json"


def test_completions_endpoint_batch_is_steered(client, http):
    body = {"model": MODEL_NAME, "prompt": "The weather today is", "max_tokens": 12, "temperature": 0,
            "return_token_ids": True, "steering": add(1, 3, 8.0)}
    batch = wait(client, submit(client, [request_line("c1", body, "/v1/completions")], endpoint="/v1/completions").id)
    (out,) = lines_of(client, batch.output_file_id)
    alone = http.post("/v1/completions", json=body).json()
    assert out["response"]["body"]["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"]
    assert out["response"]["body"]["steering"] == alone["steering"]


def test_cancel_in_progress_batch_keeps_partial_output(client):
    lines = [request_line(f"r{i}", chat_body(steering=add(1, i, 4.0) if i % 2 else None, max_tokens=200))
             for i in range(16)]
    batch = submit(client, lines)
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    batch = wait(client, batch.id, timeout=60)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    counts = batch.request_counts
    out, err = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert counts.total == 16
    assert 1 <= counts.completed < 16 and counts.failed == 0
    assert len(out) == counts.completed and err == []
    assert len({o["custom_id"] for o in out}) == len(out)
    assert all(len(o["response"]["body"]["choices"][0]["token_ids"]) == 200 for o in out)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(wait(client, submit(client, ["{broken"]).id).id)  # failed: not cancellable


@pytest.mark.parametrize("lines, code, line", [
    ([request_line("a", chat_body()), request_line("b", chat_body()), request_line("a", chat_body())],
     "duplicate_custom_id", 3),
    (["this is not JSONL", "at all"], "invalid_file_format", None),
])
def test_validation_failure(client, lines, code, line):
    batch = wait(client, submit(client, lines).id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.errors.object == "list"
    (error,) = batch.errors.data
    assert error.code == code and error.line == line and error.message


def test_list_batches_newest_first_with_pagination(client):
    ids = [submit(client, ["{broken"]).id for _ in range(3)]
    for batch_id in ids:
        wait(client, batch_id)
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more
    assert page.first_id == ids[2] and page.last_id == ids[1]
    after = client.batches.list(limit=2, after=ids[1])
    assert after.data[0].id == ids[0]
    assert [b.id for b in client.batches.list(limit=1, after=ids[2]).data] == [ids[1]]


def test_api_errors_are_openai_shaped(client, http):
    f = upload(client, [request_line("a", chat_body())])
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.create(input_file_id="file-unknown", endpoint=CHAT, completion_window="24h")
    assert exc.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert exc.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="1 day")
    assert exc.value.body["param"] == "completion_window"
    other = upload(client, [request_line("a", chat_body())], purpose="user_data")
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=other.id, endpoint=CHAT, completion_window="24h")
    assert exc.value.body["code"] == "invalid_file_purpose"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_unknown")
    raw = http.post("/v1/batches", json={"endpoint": CHAT})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_files_retrieve_list_delete(client):
    f = upload(client, [request_line("a", chat_body())])
    assert f.object == "file" and f.purpose == "batch" and f.filename == "requests.jsonl" and f.bytes > 0
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert json.loads(client.files.content(f.id).text)["custom_id"] == "a"
    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_a_batch_line_may_gate_and_trace(client, http, active_features):
    """A line with a gated edit and a trace gets the same body as the interactive request:
    tokens, the gate report in the echo, and the trace."""
    body = chat_body(steering={"features": [{"layer": 2, "index": 9, "mode": "add", "value": 6.0,
                                             "when": {"layer": 1, "index": active_features[1][1], "below": 0.5}}]},
                     trace={"layers": [1, 2], "top_k": 3}, ignore_eos=True)
    batch = wait(client, submit(client, [request_line("gated-traced", body)]).id)
    assert batch.status == "completed" and batch.request_counts.completed == 1
    (line,) = lines_of(client, batch.output_file_id)
    from_batch = line["response"]["body"]
    interactive = http.post(CHAT, json=body).json()
    assert from_batch["choices"][0]["token_ids"] == interactive["choices"][0]["token_ids"]
    assert from_batch["choices"][0]["trace"] == interactive["choices"][0]["trace"]
    assert len(from_batch["choices"][0]["trace"]) == 12
    echo = from_batch["steering"]
    assert echo == interactive["steering"] and echo["steered_tokens"] > echo["features"][0]["edited_tokens"] > 0
