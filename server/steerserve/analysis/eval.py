"""`steerserve eval`: how good are the SAEs at the served layers, and what does steering do?

Runs on a real server (started like `run-batch`, or one given by --base-url), so the same code
measures the tiny default on a laptop and Qwen3.5-27B with Qwen-Scope on GPUs:
  * SAE quality per loaded layer over a text set (one text per line of --data, default a
    built-in sample): FVU, L0 and the fraction of features that never fired (the sums come
    from the workers' captures, server/steerserve/analysis/sae_quality.py), and the downstream cost of splicing
    the SAE in (the NLL of the texts with the layer's output replaced by its reconstruction,
    minus without, and the mean per-token KL divergence of the next-token distributions from
    the unspliced model's, estimated from each run's top 20: sae_quality.kl_top_k);
  * per chosen feature, mode and value (a dose-response sweep): the activation the feature has
    when the edited stream is re-encoded at its layer (does a clamp reach its target?), the
    cross-entropy cost on the text set (mean next-token NLL of the texts' own tokens, steered
    minus unsteered; exp of it is the perplexity ratio), the KL divergence from the unsteered
    next-token distributions (same estimate), and the share of greedy tokens that
    change on a few prompts.
Writes report.json and PNG plots into --output-dir, prints a table. `run_eval` is the Python API.
The plots need matplotlib, which serving does not: the `[eval]` extra.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from steerserve.analysis.sae_quality import QualitySums, kl_top_k
from steerserve.cli.help import DefaultsFormatter
from steerserve.serve_process import (
    ServerStartError, add_server_options, parse_server_args, require_server, server_client,
)

DEFAULT_TEXTS = Path(__file__).with_name("data") / "eval_texts.txt"
PROMPTS = ["Tell me about the weather.", "Write a short poem about the sea.", "How do computers work?"]
GREEDY_TOKENS = 16
KL_TOP_K = 20  # next-token log-probabilities per position that KL is estimated from (sae_quality.kl_top_k)
EVAL_EXTRA = "pip install 'steerserve[eval]'"


@dataclass(frozen=True)
class FeatureSweep:
    layer: int
    index: int
    modes: tuple[str, ...]
    values: tuple[float, ...]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="steerserve eval", allow_abbrev=False,
                                description="SAE quality and steering-effect reports on a temporary server",
                                epilog="Every other argument (MODEL, --sae, --sae-layers, vLLM options) goes to "
                                       "`steerserve serve`.")
    p.add_argument("--data", type=Path, default=DEFAULT_TEXTS, metavar="FILE",
                   help="texts, one per line (default: built-in sample)")
    p.add_argument("--max-texts", type=int, default=20, metavar="N", help="use the first N texts of --data")
    p.add_argument("--features", default="", metavar="L:I,...",
                   help="features to sweep, e.g. 1:3,2:700 (layer:index) (default: none, quality only)")
    p.add_argument("--modes", default="clamp,add", help="modes to sweep")
    p.add_argument("--values", default="0,2,4,8,16", help="values to sweep")
    p.add_argument("--output-dir", type=Path, default=Path("eval-report"), metavar="DIR",
                   help="report.json, its tables and plots")
    add_server_options(p)
    return p


def main(argv: list[str]) -> int:
    args, serve_args = parse_server_args(_parser(), argv)
    try:
        _pyplot()  # checked before a server starts (minutes), not after the run
    except ImportError as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 1
    texts = [line.replace("\\n", "\n") for line in args.data.read_text().splitlines() if line.strip()][: args.max_texts]
    sweeps = [FeatureSweep(int(layer), int(index), tuple(args.modes.split(",")),
                           tuple(float(v) for v in args.values.split(",")))
              for layer, index in (item.split(":") for item in args.features.split(",") if item)]
    started = time.monotonic()
    require_server(_parser(), args.base_url, serve_args)
    try:
        with server_client(args.base_url, serve_args, args.server_log, timeout=600) as http:
            report = run_eval(http, texts, sweeps)
    except ServerStartError as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 1
    report["seconds"] = round(time.monotonic() - started, 1)
    write_report(report, args.output_dir)
    print(format_table(report))
    print(f"\neval: report and plots in {args.output_dir} ({report['seconds']} s)")
    return 0


def run_eval(http: httpx.Client, texts: list[str], sweeps: list[FeatureSweep]) -> dict[str, Any]:
    """The report as a dict (what report.json holds)."""
    saes = {info["layer"]: info for info in _ok(http.get("/v1/saes"))["data"]}
    model = _ok(http.get("/v1/models"))["data"][0]["id"]
    steps = len(texts) * (1 + len(saes) + sum(len(s.modes) * len(s.values) for s in sweeps)) + sum(
        len(s.modes) * len(s.values) * len(PROMPTS) for s in sweeps) + len(PROMPTS)
    progress = tqdm(total=steps, desc="steerserve eval", unit="request", file=sys.stderr)
    sums = {layer: QualitySums() for layer in saes}
    baseline_nll, baseline_logprobs = [], []
    for text in _counted(texts, progress):
        result = _inspect(http, {"prompt": text, "top_k": 1, "quality": True, "next_token_logprobs": KL_TOP_K})
        for layer, quality in result.get("quality", {}).items():
            sums[int(layer)] = sums[int(layer)] + QualitySums.from_capture(quality["sums"])
        baseline_nll.append(result["nll"])
        baseline_logprobs.append(result["next_token_logprobs"])
    splice_cost, splice_kl = {}, {}  # per layer: the layer's output replaced by its SAE reconstruction vs not
    for layer in saes:
        spliced = [_inspect(http, {"prompt": text, "layers": [layer], "top_k": 1, "quality": True, "splice": True,
                                   "next_token_logprobs": KL_TOP_K}) for text in _counted(texts, progress)]
        splice_cost[layer] = _mean([r["nll"] for r in spliced]) - _mean(baseline_nll)
        splice_kl[layer] = _mean_kl(baseline_logprobs, [r["next_token_logprobs"] for r in spliced])
    baseline_greedy = [_greedy(http, model, prompt, None) for prompt in _counted(PROMPTS, progress)]
    report: dict[str, Any] = {
        "model": model, "texts": len(texts),
        "sae_quality": {str(layer): sums[layer].summary(saes[layer]["d_sae"])
                        | {"splice_nll_increase": splice_cost[layer], "splice_kl": splice_kl[layer]}
                        for layer in sorted(saes)},
        "baseline_nll": _mean(baseline_nll), "steering": [],
    }
    for sweep in sweeps:
        for mode in sweep.modes:
            for value in sweep.values:
                steering = {"features": [{"layer": sweep.layer, "index": sweep.index, "mode": mode}
                                         | ({} if mode == "ablate" else {"value": value})]}
                steered = [_steered_text(http, text, sweep, steering) for text in _counted(texts, progress)]
                achieved, nll = _mean([a for a, _, _ in steered]), _mean([n for _, n, _ in steered])
                kl = _mean_kl(baseline_logprobs, [lp for _, _, lp in steered])
                greedy = [_greedy(http, model, prompt, steering) for prompt in _counted(PROMPTS, progress)]
                changed = [sum(a != b for a, b in zip(g, base)) / max(1, len(base))
                           for g, base in zip(greedy, baseline_greedy)]
                report["steering"].append({
                    "layer": sweep.layer, "index": sweep.index, "mode": mode, "value": value,
                    "achieved_activation": achieved, "nll_increase": nll - report["baseline_nll"],
                    "perplexity_ratio": math.exp(nll - report["baseline_nll"]), "kl": kl,
                    "greedy_changed": _mean(changed),
                })
    progress.close()
    return report


def _ok(response: httpx.Response) -> dict:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.text[:500]}")
    return response.json()


def _counted(items: list, progress) -> Any:
    for item in items:
        yield item
        progress.update()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _inspect(http: httpx.Client, body: dict) -> dict:
    return _ok(http.post("/v1/features/inspect", json=body))


def _steered_text(http: httpx.Client, text: str, sweep: FeatureSweep, steering: dict) -> tuple[float, float, list]:
    """(the feature's mean activation over the text when the stream edited at its layer is
    re-encoded, the text's NLL under the steering, its next-token log-probabilities), from one
    steered inspect: it reads features after the edit and reports watched ones at every token."""
    result = _inspect(http, {"prompt": text, "layers": [sweep.layer], "top_k": 1, "watch": [sweep.index],
                             "next_token_logprobs": KL_TOP_K, "steering": steering})
    values = [token["watched"][str(sweep.layer)][0]["activation"] for token in result["tokens"] if not token["special"]]
    return _mean(values), result["nll"], result["next_token_logprobs"]


def _mean_kl(baseline: list[list[dict]], other: list[list[dict]]) -> float:
    """Mean per-token KL(baseline || other) over every position of every text."""
    return _mean([kl_top_k(p, q, KL_TOP_K) for p_text, q_text in zip(baseline, other) for p, q in zip(p_text, q_text)])


def _greedy(http: httpx.Client, model: str, prompt: str, steering: dict | None) -> list[int]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": GREEDY_TOKENS,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True, "steering": steering}
    return _ok(http.post("/v1/chat/completions", json=body))["choices"][0]["token_ids"]


def format_table(report: dict) -> str:
    lines = [f"SAE quality on {report['texts']} texts ({report['model']}):",
             f"{'layer':>6} {'tokens':>7} {'FVU':>8} {'L0':>8} {'dead':>7} {'splice dNLL':>12} {'splice KL':>10}"]
    for layer, q in report["sae_quality"].items():
        fvu = f"{q['fvu']:.4f}" if q["fvu"] is not None else "-"
        lines.append(f"{layer:>6} {q['tokens']:>7} {fvu:>8} {q['l0']:>8.2f} {q['dead_fraction']:>7.1%} "
                     f"{q['splice_nll_increase']:>12.3f} {q['splice_kl']:>10.3f}")
    if report["steering"]:
        lines += ["", f"Steering (baseline NLL {report['baseline_nll']:.3f}):",
                  f"{'feature':>10} {'mode':>6} {'value':>7} {'achieved':>9} {'dNLL':>8} {'ppl x':>9} {'KL':>8} "
                  f"{'greedy':>7}"]
        for s in report["steering"]:
            lines.append(f"{s['layer']}:{s['index']:<8} {s['mode']:>6} {s['value']:>7g} {s['achieved_activation']:>9.3f} "
                         f"{s['nll_increase']:>8.3f} {s['perplexity_ratio']:>9.3g} {s['kl']:>8.3f} "
                         f"{s['greedy_changed']:>7.1%}")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot, headless; it is an extra, so a missing one is named with its install line."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"the plots need matplotlib, which serving does not install: {EVAL_EXTRA}") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(report: dict, out: Path) -> list[Path]:
    """report.json, sae_quality.png and one dose-response PNG per swept feature."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    written = [out / "report.json"]
    layers = list(report["sae_quality"])
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.2))
    for ax, key, title in zip(axes, ("fvu", "l0", "dead_fraction", "splice_nll_increase", "splice_kl"),
                              ("FVU", "L0", "dead fraction", "NLL increase when spliced", "KL when spliced")):
        ax.bar(layers, [report["sae_quality"][layer][key] or 0 for layer in layers], color="#4C72B0")
        ax.set_title(title)
        ax.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out / "sae_quality.png", dpi=100)
    plt.close(fig)
    written.append(out / "sae_quality.png")
    for layer, index in sorted({(s["layer"], s["index"]) for s in report["steering"]}):
        rows = [s for s in report["steering"] if (s["layer"], s["index"]) == (layer, index)]
        fig, (left, right, kl_ax) = plt.subplots(1, 3, figsize=(13, 3.2))
        for mode in dict.fromkeys(s["mode"] for s in rows):
            points = [s for s in rows if s["mode"] == mode]
            values = [s["value"] for s in points]
            left.plot(values, [s["achieved_activation"] for s in points], marker="o", label=mode)
            right.plot(values, [s["nll_increase"] for s in points], marker="o", label=mode)
            kl_ax.plot(values, [s["kl"] for s in points], marker="o", label=mode)
        left.plot(values, values, linestyle=":", color="grey", label="target")
        left.set(title=f"feature {layer}:{index}: achieved activation", xlabel="value")
        right.set(title="NLL increase on the texts", xlabel="value")
        kl_ax.set(title="KL from the unsteered model", xlabel="value")
        left.legend()
        fig.tight_layout()
        path = out / f"steering_L{layer}_{index}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
