"""The experimental Triton steering kernels against the plain-PyTorch op, in Triton's
interpreter on CPU (the kernels are never compiled here: there is no GPU). The same request
mixes as test_cpu_kernel.py, and the exact cases of test_activations.py held to the activations'
definition (ties at the k-th value, a negative JumpReLU threshold), and test_gating.py's gated
edits and test_vectors.py's direction vectors (also at a layer without an SAE) held to their definition; the cases run in a child process, because TRITON_INTERPRET must
be set before the kernels are defined."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from test_cpu_kernel import case_inputs, run_step, unsteered_rows
from test_activations import by_definition, exact_cases, steer
results = []
for name, sae, spec, hidden, residual in exact_cases():  # ties at the k-th value, a negative threshold
    expected, out = by_definition(sae, spec, hidden, residual), steer("triton", sae, spec, hidden, residual)
    results.append(dict(case="definition/" + name, steered=not torch.equal(expected, hidden),
                        max_abs=float((out.float() - expected.float()).abs().max()),
                        scale=float(expected.float().abs().max()), differing=0.0, plain_untouched=True))
for activation in ("topk", "relu", "jumprelu"):
    for dtype in (torch.bfloat16, torch.float32):
        for shape in ("decode", "prefill"):
            sae, rows, hidden, residual = case_inputs(activation, dtype, dtype, shape)
            reference = run_step("torch", sae, hidden, residual, rows, decoding=shape == "decode")
            triton_out = run_step("triton", sae, hidden, residual, rows, decoding=shape == "decode")
            plain = unsteered_rows(rows)
            results.append(dict(
                case=f"{{activation}}/{{dtype}}/{{shape}}",
                steered=bool((reference != hidden).any()),
                max_abs=float((triton_out.float() - reference.float()).abs().max()),
                scale=float(reference.float().abs().max()),
                differing=float((triton_out != reference).float().mean()),
                plain_untouched=bool(torch.equal(triton_out[plain], hidden[plain])),
            ))
print("RESULTS " + json.dumps(results))
from test_gating import gated_results
print("GATED " + json.dumps(gated_results("triton")))
from test_vectors import vector_results
print("VECTORS " + json.dumps(vector_results("triton")))
from test_vectors import vector_only_layer_result
print("VECTOR_ONLY " + json.dumps(vector_only_layer_result("triton")))
"""


def test_triton_kernels_equal_the_torch_op_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = CHILD.format(root=str(TESTS.parent), tests=str(TESTS))
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert len(results) == 18
    for r in results:
        assert r["steered"] and r["plain_untouched"], r
        if "bfloat16" in r["case"]:  # at most one rounding step apart, on a few elements (0 seen)
            assert r["max_abs"] <= 2 ** -7 * r["scale"] and r["differing"] < 0.01, r
        else:  # float32: only the summation order differs
            assert r["max_abs"] <= 1e-5, r
    line = next(line for line in done.stdout.splitlines() if line.startswith("GATED "))
    gated = json.loads(line.removeprefix("GATED "))
    assert [r["activation"] for r in gated] == ["topk", "relu", "jumprelu"]
    for r in gated:
        assert r["max_abs"] <= 1e-4 and r["counts"] == r["expected_counts"] and r["plain_untouched"], r
    line = next(line for line in done.stdout.splitlines() if line.startswith("VECTORS "))
    vectors = json.loads(line.removeprefix("VECTORS "))
    assert [r["activation"] for r in vectors] == ["topk", "relu"]
    for r in vectors:
        assert r["max_abs"] <= 1e-4 and r["steered"] and r["untouched"], r
    line = next(line for line in done.stdout.splitlines() if line.startswith("VECTOR_ONLY "))
    r = json.loads(line.removeprefix("VECTOR_ONLY "))  # a layer without an SAE (--steering-layers)
    assert r["rejected"] == 1 and r["vector_layers"] == [1], r
    assert r["max_abs"] <= 1e-4 and r["refused_untouched"] and r["steered"], r
