"""`steerserve dashboards`: feature dashboards for a corpus, built through the serving engine.

Like `eval`, it starts a private server (MODEL and serve options) or uses `--base-url`. The
corpus (a text file one document per line, JSONL with `text` or `messages`, default eval's
built-in sample) goes in batches to `POST /v1/features/dashboards`, two batches in flight so
the engine stays busy while one is merged; the workers accumulate (sae_plugins/steerserve_sae/capture/
dashboards.py) and each batch is merged into the output SQLite file and committed with its
documents (analysis/dashboard_store.py), so a rerun skips what was committed. Afterwards every
feature's logit lens (promoted and suppressed tokens) is stored, and `--labels-out` writes a
`--feature-labels` JSONL from each feature's top-example peak tokens. Documents may carry a group
(`--group-field`, e.g. their language): then each feature's firing rate per group is kept too, and
a feature that fires on much of one group's word pieces and rarely on the others' is labelled by
the group's name (the default model's build names its language features this way).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from steerserve_sae.protocol.capture import DASHBOARD_ARRAYS

from steerserve.analysis import explanations
from steerserve.analysis.dashboard_store import DashboardFileError, DashboardStore, FeatureDashboard
from steerserve.analysis.eval import DEFAULT_TEXTS, _ok
from steerserve.cli.help import DefaultsFormatter
from steerserve.serve_process import (
    ServerStartError, add_server_options, parse_server_args, require_server, server_client,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="steerserve dashboards", allow_abbrev=False,
                                description="feature dashboards (histograms, top examples, logit lens) for a corpus",
                                epilog="Every other argument (MODEL, --sae, --sae-layers, vLLM options) goes to "
                                       "`steerserve serve`.")
    p.add_argument("--data", type=Path, default=DEFAULT_TEXTS, metavar="FILE",
                   help="documents: a text file one per line, or JSONL with `text` or `messages` (default: built-in sample)")
    p.add_argument("--layers", required=True, help="SAE layers, e.g. 3 or 1,2,3")
    p.add_argument("--output", type=Path, required=True, help="the SQLite file (resumed if it exists)")
    p.add_argument("--top-n", type=int, default=20, metavar="N", help="top activating examples kept per feature")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="documents per request to the server (its reply's size depends on the SAE's width, not on this)")
    p.add_argument("--max-docs", type=int, default=None, metavar="N",
                   help="read only the first N documents of --data (default: none, all)")
    p.add_argument("--labels-out", type=Path, default=None, metavar="FILE",
                   help="also write a --feature-labels JSONL (default: none)")
    p.add_argument("--group-field", default="group", metavar="FIELD",
                   help="JSONL field naming each document's group, e.g. its language")
    add_server_options(p)
    explanations.add_arguments(p)
    return p


def read_documents(path: Path, group_field: str = "group") -> list[dict]:
    """Per document {"prompt": text} or {"messages": [...]} (and its "group" when the JSONL row
    has a string `group_field`), in file order (the order gives ids)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [{"prompt": line.replace("\\n", "\n")} for line in lines]
    docs = []
    for number, line in enumerate(lines, start=1):
        row = json.loads(line)
        if isinstance(row.get("text"), str):
            docs.append({"prompt": row["text"]})
        elif isinstance(row.get("messages"), list):
            docs.append({"messages": row["messages"]})
        else:
            raise ValueError(f"{path}:{number}: expected a `text` string or a `messages` list")
        if group_field in row:
            if not isinstance(row[group_field], str) or not row[group_field]:
                raise ValueError(f"{path}:{number}: `{group_field}` must be a non-empty string")
            docs[-1]["group"] = row[group_field]
    return docs


def main(argv: list[str]) -> int:
    args, serve_args = parse_server_args(_parser(), argv)
    layers = [int(x) for x in args.layers.split(",")]
    try:
        docs = read_documents(args.data, args.group_field)[: args.max_docs]
    except (OSError, ValueError) as exc:  # a missing file, a line that is not JSON, a bad field
        print(f"dashboards: {exc}", file=sys.stderr)
        return 1
    require_server(_parser(), args.base_url, serve_args)
    try:
        with server_client(args.base_url, serve_args, args.server_log, timeout=3600) as http:
            store = DashboardStore(args.output)
            summary = build(http, store, docs, layers, args.top_n, args.batch_size)
            if args.labels_out:
                summary["labels"] = write_labels(store, args.labels_out)
            if explanations.wanted(args):
                summary["explanations"] = explanations.run(args, http, store, layers)
            store.close()
    except (ServerStartError, DashboardFileError, explanations.ExplainError) as exc:
        print(f"dashboards: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def build(http: httpx.Client, store: DashboardStore, docs: list[dict], layers: list[int], top_n: int,
          batch_size: int) -> dict:
    """Fold the documents not yet committed into `store`, then fill in the logit lens."""
    model = _ok(http.get("/v1/models"))["data"][0]["id"]
    settings = {"model": model, "layers": sorted(layers), "top_n": top_n}
    done = store.done_docs()
    todo = [i for i in range(len(docs)) if i not in done]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    state = {layer: store.features(layer) for layer in layers}
    started, tokens = time.monotonic(), 0
    progress = tqdm(total=len(todo), desc="steerserve dashboards", unit="doc", file=sys.stderr)

    def send(ids: list[int]) -> dict:
        body = {"layers": layers, "top_n": top_n, "documents": [{"id": i, **docs[i]} for i in ids]}
        return _ok(http.post("/v1/features/dashboards", json=body))

    with ThreadPoolExecutor(2) as pool:  # the next batch runs while this one is merged
        futures = [pool.submit(send, ids) for ids in batches[:2]]
        for n, ids in enumerate(batches):
            reply = futures[n].result()
            if n + 2 < len(batches):
                futures.append(pool.submit(send, batches[n + 2]))
            if store.settings is None:
                store.start(settings | {k: reply_settings(reply)[k] for k in ("edges", "bins", "before")})
            elif n == 0:
                store.start(settings | {k: store.settings.get(k) for k in ("edges", "bins", "before")})
            batch_tokens, changed, group_tokens = merge(state, reply, top_n)
            store.commit_batch(ids, batch_tokens, changed, group_tokens)
            tokens += max(batch_tokens.values(), default=0)
            progress.update(len(ids))
            progress.set_postfix_str(f"{tokens / max(time.monotonic() - started, 1e-9):.0f} tok/s")
    progress.close()
    seconds = time.monotonic() - started
    fill_lens(http, store)
    return {"documents": len(docs), "new_documents": len(todo), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "features_fired": {str(layer): len(state[layer]) for layer in layers}}


def reply_settings(reply: dict) -> dict:
    first = next(iter(reply["layers"].values()))
    return {"edges": reply["histogram_edges"], "bins": first["bins"], "before": first["before"]}


def _arrays(layer: dict) -> dict:
    n = len(base64.b64decode(layer["features"])) // 4
    out = {}
    for name, dtype in DASHBOARD_ARRAYS.items():
        flat = np.frombuffer(base64.b64decode(layer[name]), dtype=dtype)
        out[name] = flat.reshape(n, -1) if name in ("hist", "top_val", "top_doc", "top_pos") else flat
    out["top_win"] = out["top_win"].reshape(n, layer["top_n"], layer["window"])
    out["group_fired"] = out["group_fired"].reshape(n, layer.get("groups", 0))
    return out


def merge(state: dict[int, dict[int, FeatureDashboard]], reply: dict, top_n: int):
    """Add a batch's per-layer results to the running state; (tokens per layer, changed features,
    word pieces per layer and group)."""
    tokens, changed, group_tokens = {}, {}, {}
    groups = reply.get("groups", [])
    for key, layer_reply in reply["layers"].items():
        layer = int(key)
        a = _arrays(layer_reply)
        tokens[layer] = layer_reply["tokens"]
        group_tokens[layer] = dict(zip(groups, layer_reply.get("group_tokens", [])))
        feats, before = state[layer], layer_reply["before"]
        changed[layer] = {}
        rows = a["features"].tolist()
        # a slot only matters if it beats the feature's current N-th example (once it has N)
        floors = np.array([_floor(feats.get(idx), top_n) for idx in rows], dtype=np.float32)
        candidates = a["top_val"] > floors[:, None]
        for row, idx in enumerate(rows):
            f = feats.setdefault(idx, FeatureDashboard(hist=[0] * layer_reply["bins"]))
            f.fired += int(a["fired"][row])
            f.sum += float(a["sum"][row])
            f.max = max(f.max, float(a["max"][row]))
            f.hist = (np.asarray(f.hist, dtype=np.int64) + a["hist"][row]).tolist()
            for g, n in zip(groups, a["group_fired"][row].tolist()):
                if n:
                    f.groups[g] = f.groups.get(g, 0) + n
            slots = np.flatnonzero(candidates[row])
            if slots.size:
                f.examples += [_example(reply["documents"], int(a["top_doc"][row, slot]), int(a["top_pos"][row, slot]),
                                        float(a["top_val"][row, slot]), a["top_win"][row, slot], before)
                               for slot in slots]
                f.examples = sorted(f.examples, key=lambda e: (-e["activation"], e["doc"]))[:top_n]
            changed[layer][idx] = f
    return tokens, changed, group_tokens


def _floor(f: FeatureDashboard | None, top_n: int) -> float:
    return f.examples[-1]["activation"] if f is not None and len(f.examples) >= top_n else 0.0


def _example(documents: dict, doc: int, peak: int, value: float, window: np.ndarray, before: int) -> dict:
    """The window's tokens with their activations (positions outside the document or the
    recorded chunk are left out)."""
    text = documents[str(doc)]
    kept = [(peak - before + j, float(v)) for j, v in enumerate(window.tolist())
            if not np.isnan(v) and 0 <= peak - before + j < len(text)]
    return {"activation": value, "doc": doc, "position": peak, "tokens": [text[p] for p, _ in kept],
            "activations": [v for _, v in kept]}


def fill_lens(http: httpx.Client, store: DashboardStore) -> None:
    """Each stored feature's promoted and suppressed tokens, from the server's logit lens."""
    missing = store.lens_missing()

    def one(feature: tuple[int, int]) -> tuple[int, int, list, list]:
        lens = _ok(http.get(f"/v1/features/{feature[0]}/{feature[1]}"))["logit_lens"]
        return (*feature, lens["promoted"], lens["suppressed"])

    with ThreadPoolExecutor(4) as pool:
        rows = list(tqdm(pool.map(one, missing), total=len(missing), desc="logit lens", unit="feature",
                         file=sys.stderr))
    store.put_lens(rows)


# A group feature fires on at least GROUP_MIN_RATE of its group's word pieces and at most
# GROUP_MAX_ELSEWHERE of every other group's; the strongest candidate per group and layer is named
# after the group from GROUP_LABEL_MIN_RATE on (its description gives the rates).
GROUP_MIN_RATE, GROUP_MAX_ELSEWHERE, GROUP_LABEL_MIN_RATE = 0.5, 0.1, 0.3
GROUP_DOMINANT_SHARE = 0.8  # of a feature's summed group rates: the group is shown beside its tokens


def group_rates(store: DashboardStore, layer: int) -> tuple[list[str], dict[int, list[float]]]:
    """The layer's groups and, per feature that fired, its firing rate on each group's word pieces."""
    seen = store.group_tokens(layer)
    groups = sorted(seen)
    return groups, {idx: [f.groups.get(g, 0) / max(seen[g], 1) for g in groups]
                    for idx, f in sorted(store.features(layer).items())}


def group_features(store: DashboardStore, layer: int) -> dict[str, dict]:
    """Per group, its strongest candidate feature (largest gap between its rate in the group and
    its highest rate in any other) and whether it qualifies, with the numbers behind it."""
    groups, rates = group_rates(store, layer)
    if not rates:
        return {}
    feats = store.features(layer)
    found = {}
    for g, group in enumerate(groups):
        def elsewhere(idx: int) -> float:
            return max((r for h, r in enumerate(rates[idx]) if h != g), default=0.0)

        best = max(rates, key=lambda idx: rates[idx][g] - elsewhere(idx))
        rate, other = rates[best][g], elsewhere(best)
        found[group] = {"index": best, "qualifies": rate >= GROUP_MIN_RATE and other <= GROUP_MAX_ELSEWHERE,
                        "rate_in_group": round(rate, 3), "max_rate_elsewhere": round(other, 3),
                        "rates": {h: round(r, 3) for h, r in zip(groups, rates[best])},
                        "mean_activation": round(feats[best].sum / max(feats[best].fired, 1), 3)}
    return found


def write_labels(store: DashboardStore, path: Path) -> int:
    """A `--feature-labels` JSONL: each feature labelled by the three tokens its top examples peak
    on most (weighted by activation), or by its group's name for a group's strongest feature;
    described by firing rate, mean activation, rate per group and contexts."""
    lines = []
    tokens = store.tokens()
    for layer in store.settings["layers"]:
        groups, rates = group_rates(store, layer)
        named = {v["index"]: group for group, v in group_features(store, layer).items()
                 if v["rate_in_group"] >= GROUP_LABEL_MIN_RATE and v["max_rate_elsewhere"] <= GROUP_MAX_ELSEWHERE}
        for idx, f in sorted(store.features(layer).items()):
            if not f.examples:
                continue
            weight = Counter()
            for e in f.examples:
                peak = max(range(len(e["activations"])), key=e["activations"].__getitem__)
                weight[e["tokens"][peak]] += e["activation"]
            words = [w.replace("\n", "\\n") or "?" for w, _ in weight.most_common(3)]
            label = ", ".join(f"'{w}'" for w in words)
            by_group = ""
            if groups:
                r = rates[idx]
                top = max(range(len(groups)), key=r.__getitem__)
                dominant = sum(r) > 0 and r[top] >= GROUP_DOMINANT_SHARE * sum(r)
                if idx in named:
                    label = named[idx]
                elif dominant and r[top] >= GROUP_MIN_RATE:
                    label = f"{groups[top]} text: {label}"
                elif dominant:
                    label += f" ({groups[top]})"
                by_group = _group_rates(groups, r)
            contexts = " | ".join("".join(e["tokens"]).replace("\n", " ")[-60:] for e in f.examples[:3])
            lines.append({"layer": layer, "index": idx, "label": label,
                          "description": f"fires on {f.fired / max(tokens.get(layer, 0), 1):.1%} of tokens, mean "
                                         f"activation {f.sum / max(f.fired, 1):.2f}{by_group}; top contexts: {contexts}"})
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def _group_rates(groups: list[str], rates: list[float]) -> str:
    """The groups a feature fires on at least GROUP_MAX_ELSEWHERE of, highest first: a group's
    name in a description then means something, so searching it does not match every feature."""
    shown = sorted((x, g) for g, x in zip(groups, rates) if x >= GROUP_MAX_ELSEWHERE)[::-1]
    if not shown:
        return f"; below {GROUP_MAX_ELSEWHERE:.0%} in every group"
    rest = f" (others below {GROUP_MAX_ELSEWHERE:.0%})" if len(shown) < len(groups) else ""
    return "; rate by group: " + ", ".join(f"{g} {x:.0%}" for x, g in shown) + rest
