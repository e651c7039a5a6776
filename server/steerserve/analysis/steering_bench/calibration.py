"""`--save-presets`: each concept's best steering method at its chosen strength, stored as a
preset named after the concept, so a client steers by that model name with a known effect and
cost. "Best" is judged on the selection half, like the strengths (the report half stays
untouched by every choice); the description keeps the concept's description and the report-half
scores. A preset of that name is replaced only when this command made it (its description starts
with MARK); any other is an error.
"""

from __future__ import annotations

import httpx

from steerserve.analysis.steering_bench import scoring
from steerserve.analysis.steering_bench.methods import ResolveError, Steered

MARK = "bench-steering:"


def best_method(methods: dict, swept: tuple[str, ...]) -> str | None:
    """The swept method with the highest selection-half mean at its chosen strength (ties: the
    first swept), None if none has one."""
    scored = [(m, methods[m]["by_strength"][f"{methods[m]['strength']:g}"][scoring.SELECTION])
              for m in swept if m in methods]
    scored = [(m, v) for m, v in scored if v is not None]
    if not scored:
        return None
    best = max(v for _, v in scored)
    return next(m for m, v in scored if v == best)


def _fmt(interval: dict | None) -> str:
    return "-" if interval is None else f"{interval['mean']:.2f} [{interval['low']:.2f}, {interval['high']:.2f}]"


def description(steered: Steered, method: str, entry: dict, judge: str) -> str:
    return (f"{MARK} {steered.concept.description}; {method} at {entry['strength']:g}x; report half "
            f"({entry['answers']} answers, judge {judge}): harmonic {_fmt(entry['harmonic'])}, concept "
            f"{_fmt(entry['concept_score'])}, relevance {_fmt(entry['relevance'])}, fluency {_fmt(entry['fluency'])}")


def save_presets(http: httpx.Client, steered: list[Steered], summary: dict) -> dict[str, str]:
    """Store each concept's preset; concept name -> the method it steers with (concepts with no
    chosen method are left out)."""
    saved = {}
    for s in steered:
        name = s.concept.name
        methods = summary["concepts"][name]["methods"]
        method = best_method(methods, s.swept)
        if method is None:
            continue
        existing = http.get(f"/v1/steering/presets/{name}")
        if existing.status_code == 200:
            if not (existing.json().get("description") or "").startswith(MARK):
                raise ResolveError(f"{s.concept.where}: concept {name!r}: a preset named {name!r} exists and "
                                   "bench-steering did not make it: delete it or rename the concept")
            http.delete(f"/v1/steering/presets/{name}")
        body = {"name": name, "steering": s.spec(method, methods[method]["strength"], ()),
                "description": description(s, method, methods[method], summary["judge"])}
        response = http.post("/v1/steering/presets", json=body)
        if response.status_code != 200:
            raise ResolveError(f"{s.concept.where}: concept {name!r}: storing its preset: the server answered "
                               f"{response.status_code}: {response.text[:300]}")
        saved[name] = method
    return saved
