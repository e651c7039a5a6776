"""The API-to-worker protocol: the worker methods the API calls over collective RPC, the stores
it takes finished requests' results from, the `extra_args` keys it sets, and the shapes of the
workers' replies.

Torch-free, so the API layer (steerserve) reads it without importing the workers' machinery;
vllm_hooks/worker_extension.py implements the methods named here. Every RPC reaches every
worker rank (server/steerserve/engine_rpc.py) and each rank replies with plain data (vLLM serialises it
across processes), typed below; the `merge_*` functions say how the ranks' replies combine:
tensor-parallel ranks agree, pipeline stages each answer for their own layers.
"""

from __future__ import annotations

import json
from typing import Literal

from typing_extensions import TypedDict  # pydantic reads (GET /v1/saes) no typing.TypedDict before 3.12

from steerserve_sae.protocol import signing

# Methods of the worker extension (SteeringWorkerExtension), called by name.
SAE_INFO = "steerserve_sae_info"  # () -> list[SAEInfo]: the layers this rank loaded
STATS = "steerserve_stats"  # () -> WorkerStats
TAKE = "steerserve_take"  # (wanted, discarded=()) -> per wanted (store, key), its result or None
VERIFY_SIGNATURE = "steerserve_verify_signature"  # (signed) -> None, or why this rank refuses it
FEATURE_REPORT = "steerserve_feature_report"  # (layer, index, top_n) -> FeatureReport | None
TOKEN_FEATURES = "steerserve_token_features"  # (token_id, layers, top_n) -> TokenFeatures | None
METHODS = (SAE_INFO, STATS, TAKE, VERIFY_SIGNATURE, FEATURE_REPORT, TOKEN_FEATURES)

# What a worker keeps for the API to take (capture/store.py), by store: inspect captures and
# traces (by capture id, or trace_key per choice), gated specs' reports (by report id), and the
# specs a worker refused (by the request's ticket, capture/rejections.py).
Store = Literal["captures", "gate_reports", "rejections"]
CAPTURES: Store = "captures"
GATE_REPORTS: Store = "gate_reports"
REJECTIONS: Store = "rejections"
TAKE_STORES: tuple[Store, ...] = (CAPTURES, GATE_REPORTS, REJECTIONS)
Wanted = tuple[str, str]  # (one of TAKE_STORES, key)
FULL_MARKER = "steerserve_store_full"  # the key of a take's answer for an entry that outgrew the budget

# Keys of SamplingParams.extra_args the workers read (all under signing.RESERVED_PREFIX).
EXTRA_ARGS_KEY = "steerserve_steering"  # the signed SteeringSpec (spec.py)
CAPTURE_KEY = "steerserve_capture"  # the signed CaptureSpec (capture.py)
GATE_REPORT_KEY = "steerserve_gate_report"  # the signed id gate counts are kept under (report_extra_arg)
TICKET_KEY = "steerserve_ticket"  # unsigned: where a worker records refusing the request's spec
EXTRA_ARGS_KEYS = (EXTRA_ARGS_KEY, CAPTURE_KEY, GATE_REPORT_KEY, TICKET_KEY)


def trace_key(capture_id: str, choice: int) -> str:
    """Where a trace's result for one choice is kept (a trace records per choice)."""
    return f"{capture_id}/{choice}"


def report_extra_arg(report_id: str) -> str:
    return signing.sign(json.dumps({"id": report_id}))


def report_id_from_extra_arg(raw: object) -> str:
    return str(json.loads(signing.verify(raw))["id"])


class SAEInfo(TypedDict):
    """One loaded layer, as `GET /v1/saes` reports it."""

    layer: int
    d_model: int
    d_sae: int
    k: int | None
    architecture: str
    hook_point: str
    dtype: str
    source: str  # relative to --sae, or under hf://owner/name@<commit>/
    model: str | None  # the model the SAE was trained on, from a Qwen-Scope name (None when unknown)
    memory_bytes: int


class WorkerStats(TypedDict, total=False):
    """A rank's counters and gauges (empty where no SAE is loaded)."""

    steered_tokens_total: int
    active_configs: int
    rejected_requests_total: int
    sae_memory_bytes: dict[int, int]
    sae_layers: list[int]
    vector_layers: list[int]  # layers steered by direction vectors only (--steering-layers without an SAE)
    steering_kernel: str
    steering_seconds_total: float
    execute_seconds_total: float
    store_entries: int
    store_bytes: int
    store_max_bytes: int
    store_full_total: int


class GateReport(TypedDict):
    """A gated spec's report: routed tokens, and per gate column (SteeringSpec.gates) the tokens
    that passed it."""

    tokens: int
    passed: list[int]


class LayerCapture(TypedDict, total=False):
    """One layer of a capture or trace, positions in order (capture/features.py)."""

    positions: list[int]
    indices: list[list[int]]  # per position, its top-k features
    values: list[list[float]]
    watched: list[list[float]]  # per position, the watched features' activations
    residuals: list[str | None]  # per position, its stream (RESIDUAL_ENCODING; None: over the bound)
    quality: dict  # reconstruction sums (server/steerserve/analysis/sae_quality.py)
    aggregate: dict  # inspect only: num_tokens, by_max, by_mean


Capture = dict[int, LayerCapture]  # by layer
TokenFeatures = dict[int, list[list]]  # by layer, [feature, logit] pairs, best first


class FeatureReport(TypedDict):
    """A decoder direction's norms and logit lens ([token id, logit] pairs)."""

    decoder_norm: float
    encoder_norm: float
    encoder_decoder_cosine: float
    promoted: list[list]
    suppressed: list[list]


# Stats of data-parallel engines that add up; the rest (SAE layers and memory, the kernel) are
# the same on every engine.
SUMMED_STATS = ("steered_tokens_total", "active_configs", "rejected_requests_total", "steering_seconds_total",
                "execute_seconds_total", "store_entries", "store_bytes", "store_full_total")


def merge_sae_info(per_rank: list[list[SAEInfo]]) -> tuple[list[SAEInfo], tuple[frozenset[int], ...]]:
    """Every loaded layer (pipeline stages each load only their own), sorted, and the layer set
    of each stage."""
    by_layer = {info["layer"]: info for rank in per_rank for info in rank}
    stages = {frozenset(info["layer"] for info in rank) for rank in per_rank if rank}
    return [by_layer[layer] for layer in sorted(by_layer)], tuple(stages)


def merge_stats(per_engine: list[WorkerStats]) -> WorkerStats:
    """One rank's stats per data-parallel engine (its ranks agree), as one: SUMMED_STATS added
    up, the rest as engine 0 has them."""
    stats = [s for s in per_engine if s]
    if not stats:
        return {}
    return {**stats[0], **{key: sum(s.get(key, 0) for s in stats) for key in SUMMED_STATS}}


def merge_layers(per_rank: list[dict | None]) -> dict:
    """Per-layer replies (Capture, TokenFeatures) as one: each pipeline stage holds its own
    layers, tensor-parallel ranks agree (or only one holds the answer)."""
    return {int(layer): result for rank in per_rank if rank for layer, result in rank.items()}


def merge_gate_reports(per_rank: list[GateReport | None]) -> GateReport:
    """One report from every rank's: tensor-parallel ranks agree; pipeline stages each count the
    gates on their own layers (the others read 0)."""
    reports = [r for r in per_rank if r]
    if not reports:
        return {"tokens": 0, "passed": []}
    return {"tokens": max(r["tokens"] for r in reports),
            "passed": [max(counts) for counts in zip(*(r["passed"] for r in reports))]}


def first_reply(per_rank: list):
    """The reply of the rank that has one (a feature report: the rank holding full logits)."""
    return next((r for r in per_rank if r is not None), None)


def store_full_reason(per_rank: list) -> str | None:
    """Why a take's result is missing, if a rank's store outgrew its budget (its FULL_MARKER)."""
    return next((r[FULL_MARKER] for r in per_rank if isinstance(r, dict) and FULL_MARKER in r), None)
