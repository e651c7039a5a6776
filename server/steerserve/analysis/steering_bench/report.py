"""From scored rows to summary.json, report.md and plots: per concept x method the strength used
(chosen on the selection half; random-M and prompt+M use M's), and on the report half the mean of
each score with its bootstrap interval, the answers counted and those a judge left unparseable.
"""

from __future__ import annotations

import json
from pathlib import Path

from steerserve.analysis.steering_bench import scoring
from steerserve.analysis.steering_bench.methods import FIXED, Steered

SCALES = ("concept_score", "relevance", "fluency", "harmonic")


def _interval(values: list[float], seed: int) -> dict | None:
    if not values:
        return None
    found = scoring.bootstrap(values, seed)
    return {"mean": round(found.mean, 4), "low": round(found.low, 4), "high": round(found.high, 4)}


def _rows(rows: list[dict], concept: str, method: str, strength: float | None, split: str) -> list[dict]:
    return sorted((r for r in rows if r["concept"] == concept and r["method"] == method
                   and r["strength"] == strength and r["split"] == split), key=lambda r: r["instruction"])


def summarise(steered: list[Steered], chosen: dict[str, dict[str, float]], rows: list[dict], seed: int) -> dict:
    concepts = {}
    for s in steered:
        name = s.concept.name
        methods = {}
        for method in (*s.methods, *(f"prompt+{m}" for m in s.swept)):
            base = method.removeprefix("prompt+").removeprefix("random-")
            strength = None if method in FIXED else chosen[name].get(base)
            if method not in FIXED and strength is None:
                continue  # not run (--methods), or nothing scored on the selection half
            scored = _rows(rows, name, method, strength, scoring.REPORT)
            if not scored:
                continue
            entry = {"strength": strength, "answers": len(scored),
                     "unparsed": sum(bool(r["unparsed"]) for r in scored)}
            for scale in SCALES:
                entry[scale] = _interval([r[scale] for r in scored if r[scale] is not None], seed)
            if method in s.swept or method.startswith("random-"):
                entry["by_strength"] = {
                    f"{st:g}": {half: scoring.mean([r["harmonic"] for r in _rows(rows, name, method, st, half)
                                                    if r["harmonic"] is not None])
                                for half in (scoring.SELECTION, scoring.REPORT)}
                    for st in sorted({r["strength"] for r in rows if r["concept"] == name and r["method"] == method})}
            methods[method] = entry
        # methods that ran but had no scored selection answer to choose a strength by
        not_chosen = [m for m in s.swept if m not in chosen[name]
                      and any(r["concept"] == name and r["method"] == m for r in rows)]
        concepts[name] = {"description": s.concept.description, "source": s.concept.source, "where": s.concept.where,
                          "methods": methods, "not_chosen": not_chosen}
    return {"concepts": concepts}


def _fmt(interval: dict | None) -> str:
    return "-" if interval is None else f"{interval['mean']:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]"


def table(summary: dict) -> str:
    """The summary as a Markdown table (also what the command prints)."""
    harmonic = ("harmonic mean (concept, relevance, fluency)" if summary["relevance_judged"]
                else "harmonic mean (concept, fluency; relevance not judged)")
    lines = [f"| concept | method | strength | {harmonic} | concept | relevance | fluency | answers | unparsed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, concept in summary["concepts"].items():
        for method, m in concept["methods"].items():
            strength = "-" if m["strength"] is None else f"{m['strength']:g}"
            lines.append(f"| {name} | {method} | {strength} | {_fmt(m['harmonic'])} | {_fmt(m['concept_score'])} | "
                         f"{_fmt(m['relevance'])} | {_fmt(m['fluency'])} | {m['answers']} | {m['unparsed']} |")
    return "\n".join(lines)


def _examples(summary: dict, rows: list[dict]) -> list[str]:
    """Per concept, its best and worst steered answers (report half, chosen strengths) beside
    the prompted and unsteered answers to the same instruction."""
    out = []
    for name, concept in summary["concepts"].items():
        steered = [r for method, m in concept["methods"].items()
                   if method not in ("none", "prompt", "ablate") and not method.startswith(("random-", "prompt+"))
                   for r in _rows(rows, name, method, m["strength"], scoring.REPORT) if r["harmonic"] is not None]
        if not steered:
            continue
        ranked = sorted(steered, key=lambda r: (-r["harmonic"], r["instruction"], r["method"]))
        out += [f"### {name}: {concept['description']}", ""]
        for label, row in (("best", ranked[0]), ("worst", ranked[-1])):
            out.append(f"**{label} steered answer** (instruction `{row['instruction']}`):")
            out.append("")
            same = {r["method"]: r for r in rows if r["concept"] == name and r["instruction"] == row["instruction"]
                    and r["method"] in ("none", "prompt")}
            for method, shown in ((f"{row['method']} at {row['strength']:g}", row),
                                  ("prompt", same.get("prompt")), ("none", same.get("none"))):
                if shown is not None:
                    out.append(f"- {method} (harmonic {shown['harmonic']}, concept {shown['concept_score']}, "
                               f"fluency {shown['fluency']}): {json.dumps(shown['text'], ensure_ascii=False)}")
            out.append("")
    return out


def _notes(summary: dict) -> list[str]:
    """Beside the table: methods with no strength to report, presets stored, capability."""
    notes = [f"- {name}: {', '.join(c['not_chosen'])} had no judged answer on the selection half, so no strength "
             "was chosen and nothing is reported for them (see `unparsed` in scores.jsonl)"
             for name, c in summary["concepts"].items() if c["not_chosen"]]
    notes += [f"- preset `{name}` stored: {method} at its chosen strength (`GET /v1/steering/presets/{name}`)"
              for name, method in summary.get("presets", {}).items()]
    if "capability" in summary:
        cap = summary["capability"]
        notes.append(f"- capability ({cap['questions']} multiple-choice questions, by likelihood): unsteered "
                     f"{cap['unsteered']:.0%}; " + "; ".join(
                         f"{name} ({c['method']} at {c['strength']:g}) {c['accuracy']:.0%}"
                         for name, c in cap["steered"].items()))
    return [*notes, ""] if notes else []


def write(out: Path, summary: dict, rows: list[dict]) -> list[Path]:
    """summary.json, report.md and (with matplotlib) one score-vs-strength plot per concept and
    one concept-vs-fluency plot."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    relevance = ("" if summary["relevance_judged"] else
                 " Relevance was not judged (no LLM judge): the harmonic mean is over concept and fluency only.")
    lines = ["# Steering benchmark", "",
             f"Model `{summary['model']}`, judge `{summary['judge']}`; {summary['instructions']['selection']} "
             f"instructions chose each method's strength, the other {summary['instructions']['report']} give every "
             f"number below (mean [95% bootstrap interval over instructions]).{relevance} Strengths tried: "
             f"{', '.join(f'{s:g}' for s in summary['strengths'])}.", "", table(summary), "", *_notes(summary),
             "## Examples", "", *_examples(summary, rows)]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    written = [out / "summary.json", out / "report.md"]
    try:
        from steerserve.analysis.eval import _pyplot

        plt = _pyplot()
    except ImportError:
        return written
    for name, concept in summary["concepts"].items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for method, m in concept["methods"].items():
            if "by_strength" in m:
                points = [(float(s), v[scoring.REPORT]) for s, v in m["by_strength"].items()
                          if v[scoring.REPORT] is not None]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method,
                        linestyle="--" if method.startswith("random-") else "-")
            elif method in ("none", "prompt") and m["harmonic"] is not None:
                ax.axhline(m["harmonic"]["mean"], linestyle=":", color="grey" if method == "none" else "black",
                           label=method)
        ax.set(title=f"{name}: score vs strength (report half)", xlabel="strength", ylabel="harmonic mean", ylim=(0, 2))
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"strength_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, concept in summary["concepts"].items():
        for method, m in concept["methods"].items():
            if m["concept_score"] is not None and m["fluency"] is not None:
                ax.scatter(m["fluency"]["mean"], m["concept_score"]["mean"])
                ax.annotate(f"{name}:{method}", (m["fluency"]["mean"], m["concept_score"]["mean"]), fontsize=6)
    ax.set(title="concept vs fluency (report half)", xlabel="fluency", ylabel="concept", xlim=(0, 2), ylim=(0, 2))
    fig.tight_layout()
    fig.savefig(out / "concept_vs_fluency.png", dpi=100)
    plt.close(fig)
    return [*written, out / "concept_vs_fluency.png"]
