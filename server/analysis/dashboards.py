"""`steerserve dashboards`: feature dashboards for a corpus, built through the serving engine.

Like `eval`, it starts a private server (MODEL and serve options) or uses `--base-url`. The
corpus (a text file one document per line, JSONL with `text` or `messages`, default eval's
built-in sample) goes in batches to `POST /v1/features/dashboards`, two batches in flight so
the engine stays busy while one is merged; the workers accumulate (sae_plugins/capture/
dashboards.py) and each batch is merged into the output SQLite file and committed with its
documents (analysis/dashboard_store.py), so a rerun skips what was committed. Afterwards every
feature's logit lens (promoted and suppressed tokens) is stored, and `--labels-out` writes a
`--feature-labels` JSONL from each feature's top-example peak tokens.
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
from steerserve.serve_process import ServerStartError, server_client


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerserve dashboards", allow_abbrev=False,
                                description="feature dashboards (histograms, top examples, logit lens) for a corpus",
                                epilog="Every other argument (MODEL, --sae, --sae-layers, vLLM options) goes to "
                                       "`steerserve serve`.")
    p.add_argument("--data", type=Path, default=DEFAULT_TEXTS,
                   help="documents: a text file one per line, or JSONL with `text` or `messages` (default: built-in sample)")
    p.add_argument("--layers", required=True, help="SAE layers, e.g. 3 or 1,2,3")
    p.add_argument("--output", type=Path, required=True, help="the SQLite file (resumed if it exists)")
    p.add_argument("--top-n", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256,
                   help="documents per request to the server (its reply's size depends on the SAE's width, not on this)")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--labels-out", type=Path, default=None, help="also write a --feature-labels JSONL")
    p.add_argument("--base-url", help="use a running server instead of starting one")
    p.add_argument("--server-log", type=Path, default=None)
    explanations.add_arguments(p)
    return p


def read_documents(path: Path) -> list[dict]:
    """Per document {"prompt": text} or {"messages": [...]}, in file order (the order gives ids)."""
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
    return docs


def main(argv: list[str]) -> int:
    args, serve_args = _parser().parse_known_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    docs = read_documents(args.data)[: args.max_docs]
    if args.base_url is None and not serve_args:
        _parser().error("give the MODEL and its serve options (or --base-url)")
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
            batch_tokens, changed = merge(state, reply, top_n)
            store.commit_batch(ids, batch_tokens, changed)
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
    return out


def merge(state: dict[int, dict[int, FeatureDashboard]], reply: dict, top_n: int):
    """Add a batch's per-layer results to the running state; (tokens per layer, changed features)."""
    tokens, changed = {}, {}
    for key, layer_reply in reply["layers"].items():
        layer = int(key)
        a = _arrays(layer_reply)
        tokens[layer] = layer_reply["tokens"]
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
            slots = np.flatnonzero(candidates[row])
            if slots.size:
                f.examples += [_example(reply["documents"], int(a["top_doc"][row, slot]), int(a["top_pos"][row, slot]),
                                        float(a["top_val"][row, slot]), a["top_win"][row, slot], before)
                               for slot in slots]
                f.examples = sorted(f.examples, key=lambda e: (-e["activation"], e["doc"]))[:top_n]
            changed[layer][idx] = f
    return tokens, changed


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


def write_labels(store: DashboardStore, path: Path) -> int:
    """A `--feature-labels` JSONL: each feature labelled by the three tokens its top examples peak
    on most (weighted by activation), described by firing rate, mean activation and contexts."""
    lines = []
    tokens = store.tokens()
    for layer in store.settings["layers"]:
        for idx, f in sorted(store.features(layer).items()):
            if not f.examples:
                continue
            weight = Counter()
            for e in f.examples:
                peak = max(range(len(e["activations"])), key=e["activations"].__getitem__)
                weight[e["tokens"][peak]] += e["activation"]
            words = [w.replace("\n", "\\n") or "?" for w, _ in weight.most_common(3)]
            contexts = " | ".join("".join(e["tokens"]).replace("\n", " ")[-60:] for e in f.examples[:3])
            lines.append({"layer": layer, "index": idx, "label": ", ".join(f"'{w}'" for w in words),
                          "description": f"fires on {f.fired / max(tokens.get(layer, 0), 1):.1%} of tokens, mean "
                                         f"activation {f.sum / max(f.fired, 1):.2f}; top contexts: {contexts}"})
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return len(lines)
