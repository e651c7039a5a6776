"""Every limit the HTTP layer enforces, with its default: one home, read by the CLI (which
exposes each as a `steerserve serve` option of the same name), the middleware, the features
API and the batch service. A request over a limit gets an OpenAI-shaped 4xx, never a 5xx.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from steerserve_sae.protocol.plugin_config import DEFAULT_MAX_VECTORS

MiB = 1 << 20
MAX_TOP_K = 100  # most features listed per token: inspect's top_k and watch, a trace's top_k


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


class PriorityRange(NamedTuple):
    """The `priority` values a client may send (vLLM serves lower numbers first), bounds
    included; None: unbounded on that side. Written LOW:HIGH, either side may be empty."""

    low: int | None
    high: int | None

    @staticmethod
    def parse(text: str) -> "PriorityRange":
        low, colon, high = text.partition(":")
        try:
            bounds = PriorityRange(int(low) if low.strip() else None, int(high) if high.strip() else None)
        except ValueError:
            bounds = None
        if not colon or bounds is None or (bounds.low is not None and bounds.high is not None and bounds.low > bounds.high):
            raise argparse.ArgumentTypeError(f"{text!r} is not a priority range LOW:HIGH (e.g. 0: or -10:100)")
        return bounds

    def allows(self, value: int) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"from {self.low} to {self.high}"
        if self.low is not None or self.high is not None:
            return f"{self.low} or more" if self.low is not None else f"{self.high} or less"
        return "any integer"

    def __str__(self) -> str:
        return f"{'' if self.low is None else self.low}:{'' if self.high is None else self.high}"

    def clamp(self, value: int) -> int:
        value = value if self.low is None else max(value, self.low)
        return value if self.high is None else min(value, self.high)


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = _limit(
        16 * MiB, "largest JSON request body on any route, in bytes (413 above); uploads have their own limit")
    max_json_depth: int = _limit(
        64, "deepest nesting of objects and arrays in a JSON body (400 above): deep enough for any "
            "tool or response-format schema, far below what would exhaust a parser's recursion")
    max_steering_value: float = _limit(
        1e4, "largest |value| of a steering edit (400 above): bigger values only turn the residual "
             "stream into inf/NaN; Qwen-Scope's community ports steer with 5 to 100")
    max_steering_vectors: int = _limit(
        DEFAULT_MAX_VECTORS, "most direction vectors one request may steer with, over all layers (400 above); "
                             "each worker reserves this many d_model float32 rows per steering config slot")
    max_upload_bytes: int = _limit(200 * MiB, "largest file uploaded to /v1/files, in bytes (413 above)")
    max_vector_upload_bytes: int = _limit(
        64 * MiB, "largest file uploaded to /v1/steering/vectors, in bytes (413 above)")
    max_stored_vectors: int = _limit(
        4096, "most vectors /v1/steering/vectors stores, counting each layer of a control vector (400 above); "
              "each is d_model float32s, held in memory")
    max_presets: int = _limit(
        256, "most steering presets stored, a --steering-presets file's included (400 on creating one more over "
             "HTTP): each is a /v1/models entry, and every client lists the models")
    max_preset_description_chars: int = _limit(
        1000, "longest `description` of a steering preset, in characters (400 above); it is shown in /v1/models")
    max_preset_spec_bytes: int = _limit(
        64 * 1024, "largest `steering` spec of a preset, as compact JSON, in bytes (400 above): name stored vectors "
                   "(/v1/steering/vectors) rather than inline large ones")
    max_batch_lines: int = _limit(50_000, "most lines in one batch input file (the batch fails validation above)")
    max_inspect_chars_per_token: int = _limit(
        32, "inspect refuses, before tokenizing, inputs longer than this many characters per token of "
            "context (the token count is checked after tokenizing too)")
    max_contrast_texts: int = _limit(
        64, "most examples in each set (positive, negative) of /v1/features/contrast (400 above)")
    max_contrast_tokens: int = _limit(
        16384, "most tokens of all the examples of one /v1/features/contrast request (400 above)")
    max_trace_features: int = _limit(
        256, "most features a `trace` returns per position, layers x top_k (400 above): a trace's size "
             "grows with its positions times this")
    max_trace_residuals: int = _limit(
        4096, "most residual vectors a `trace` with `residuals` returns per request, positions x layers x "
              "choices (400 above); each is d_model float32s")
    client_priority_range: PriorityRange = _limit(
        PriorityRange(0, None), "the `priority` values a request may carry, LOW:HIGH (400 outside): vLLM serves "
        "lower numbers first, so by default no client outranks the default 0; batch lines run at 1 or later, "
        "clamped into this range")
    token_search_cache_bytes: int = _limit(
        64 * MiB, "bytes of the features API's token-search cache, estimated per search (least recently used "
                  "dropped; a search deep into 8 layers holds about 27 MB)")

    @staticmethod
    def from_args(args: Any) -> "Limits":
        """The limits a `steerserve serve` namespace sets (missing options keep their default)."""
        given = {f.name: getattr(args, f.name) for f in fields(Limits) if getattr(args, f.name, None) is not None}
        return Limits(**given)

    @staticmethod
    def add_arguments(group: Any) -> None:
        """One `--max-...` option per limit, default and help from this class."""
        for f in fields(Limits):
            parse = PriorityRange.parse if isinstance(f.default, PriorityRange) else type(f.default)
            group.add_argument("--" + f.name.replace("_", "-"), type=parse, default=f.default,
                               help=f"{f.metadata['help']} (default: %(default)s)")
