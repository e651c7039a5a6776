"""One dashboard take from the parts that data-parallel engines return.

A dashboard batch's documents are requests, and with data parallelism each engine runs some of
them: every engine's workers then hold a part of the batch's accumulators (capture/dashboards.py)
and the take (which reaches every engine) returns each part. Within an engine only the first
tensor-parallel rank answers (its peers hold the same numbers) and pipeline stages answer for
their own layers, so the parts of one layer are disjoint sets of documents and combine exactly:
counts and sums add up, maxima take the larger, and each feature keeps the `top_n` best of the
parts' examples.
"""

from __future__ import annotations

import numpy as np

from steerserve_sae.protocol.capture import DASHBOARD_ARRAYS

SUMMED = ("fired", "sum", "hist", "group_fired")
MAXED = ("max",)
TOP = ("top_val", "top_doc", "top_pos", "top_win")
EMPTY_SLOT = {"top_val": 0, "top_doc": -1, "top_pos": 0, "top_win": np.nan}  # as the accumulator fills one
SETTINGS = ("top_n", "bins", "window", "before", "groups")


def merge_dashboard_layers(per_rank: list[dict | None]) -> dict[int, dict]:
    """Per layer, the dashboard result of all the engines' parts (one part: as it came)."""
    parts: dict[int, list[dict]] = {}
    for reply in per_rank:
        for layer, result in (reply or {}).items():
            parts.setdefault(int(layer), []).append(result)
    return {layer: merge_parts(results) for layer, results in parts.items()}


def decode(result: dict) -> dict[str, np.ndarray]:
    """A result's arrays (DASHBOARD_ARRAYS), shaped one row per feature."""
    n = len(result["features"]) // np.dtype(DASHBOARD_ARRAYS["features"]).itemsize
    shapes = {"hist": (n, result["bins"]), "top_win": (n, result["top_n"], result["window"]),
              "group_fired": (n, result.get("groups", 0))}
    shapes.update({name: (n, result["top_n"]) for name in TOP if name != "top_win"})
    return {name: np.frombuffer(result[name], dtype=dtype).reshape(shapes.get(name, (n,)))
            for name, dtype in DASHBOARD_ARRAYS.items()}


def merge_parts(results: list[dict]) -> dict:
    if len(results) == 1:
        return results[0]
    if unknown := set(DASHBOARD_ARRAYS) - {"features", *SUMMED, *MAXED, *TOP}:
        raise ValueError(f"no merge rule for dashboard arrays {sorted(unknown)}")
    settings = {key: results[0].get(key) for key in SETTINGS}
    if any(r.get(key) != settings[key] for r in results for key in SETTINGS):
        raise ValueError("dashboard parts were recorded with different settings")
    arrays = [decode(r) for r in results]
    features = np.unique(np.concatenate([a["features"] for a in arrays]))
    rows = [np.searchsorted(features, a["features"]) for a in arrays]
    merged = {"features": features}
    for name in (n for n in (*SUMMED, *MAXED) if n in DASHBOARD_ARRAYS):
        out = np.zeros((len(features), *arrays[0][name].shape[1:]), dtype=DASHBOARD_ARRAYS[name])
        for a, at in zip(arrays, rows):
            out[at] = out[at] + a[name] if name in SUMMED else np.maximum(out[at], a[name])
        merged[name] = out
    # every part's slots side by side per feature, then the top_n by activation (stable: the
    # earlier part first on a tie)
    slots = {name: np.full((len(features), settings["top_n"] * len(arrays), *arrays[0][name].shape[2:]),
                           EMPTY_SLOT[name], dtype=DASHBOARD_ARRAYS[name]) for name in TOP}
    for p, (a, at) in enumerate(zip(arrays, rows)):
        columns = slice(p * settings["top_n"], (p + 1) * settings["top_n"])
        for name in TOP:
            slots[name][at, columns] = a[name]
    best = np.argsort(-slots["top_val"], axis=1, kind="stable")[:, :settings["top_n"]]
    for name in TOP:
        index = best if name != "top_win" else best[:, :, None]
        merged[name] = np.take_along_axis(slots[name], index, axis=1)
    group_tokens = [sum(counts) for counts in zip(*(r.get("group_tokens", []) for r in results))]
    return {**settings, "tokens": sum(r["tokens"] for r in results), "group_tokens": group_tokens,
            **{name: np.ascontiguousarray(merged[name], dtype=dtype).tobytes() for name, dtype in DASHBOARD_ARRAYS.items()}}
