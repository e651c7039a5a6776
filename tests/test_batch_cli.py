"""`steerserve run-batch`: a temporary server, the Files + Batches API, results on disk."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import MODEL_NAME, PROMPT, ROOT, SAE_LAYERS, STEERSERVE, server_env


def test_run_batch_writes_outputs_and_errors(tiny_model_dir, tmp_path):
    def line(custom_id, **extra):
        body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})

    steering = {"features": [{"layer": 1, "index": 3, "mode": "add", "value": 8.0}]}
    bad = {"features": [{"layer": 1, "index": 99999, "mode": "add", "value": 8.0}]}
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([line("plain"), line("steered", steering=steering), line("bad", steering=bad),
                                 line("plain-2", max_tokens=4)]) + "\n")
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [*STEERSERVE, "run-batch", "-i", str(source), "-o", str(out),
         str(tiny_model_dir), "--sae", str(tiny_model_dir / "sae"), "--sae-layers", ",".join(map(str, SAE_LAYERS)),
         "--dtype", "bfloat16", "--max-model-len", "1024", "--gpu-memory-utilization", "0.05",
         "--served-model-name", MODEL_NAME, "--seed", "0", "--enforce-eager"],
        capture_output=True, text=True, env=server_env(), cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = [json.loads(x) for x in out.read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == ["plain", "steered", "plain-2"]  # input order
    assert outputs[1]["response"]["body"]["steering"]["features"] == steering["features"]
    assert "steering" not in outputs[0]["response"]["body"]
    assert outputs[2]["response"]["body"]["usage"]["completion_tokens"] == 4
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "index_out_of_range"
    assert "4 requests, 3 completed, 1 failed" in result.stderr
    assert "wall" in result.stderr
