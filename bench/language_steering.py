"""Language steering on the shipped default model: for each corpus language, clamp its language
feature (found by label search, as a user would) and count how many of 20 greedy answers to
prompts in another language come out in it, judged by `lingua` over all its languages with a
function-word check (models/recipe/language_steering.py: `identify`).

Starts `steerserve serve` exactly as `make serve` does (unless --base-url is given) and prints,
per target language and clamp value, the share of answers in the prompts' language unsteered
and the share in the target language steered.

    python bench/language_steering.py                  # ~3 minutes on the 2-core CPU machine
    python bench/language_steering.py --multipliers 2,3,4
    python bench/language_steering.py --prompts untuned

`--prompts untuned` uses a second set of 20 English and 20 German prompts, written once for
issue 21 and never used to choose a feature, a clamp value or the judge: the README's numbers
must hold on prompts nobody tuned to.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "fortunes-qwen3.5"
NAME = "fortunes-qwen3.5"
KEY = "language-steering-key"

UNTUNED_ENGLISH = (
    "Why do birds fly south in winter?", "How do I boil an egg?", "What was the best day of your week?",
    "Explain how a bicycle works.", "Which book should I read next?", "Where do you like to walk?",
    "Can you describe your home town?", "What makes a good teacher?", "How do plants drink water?",
    "What is your favourite season and why?", "Tell me how to plant a tree.", "Who invented the telephone?",
    "What happens when it snows?", "How should I spend a rainy Sunday?", "What do dogs dream about?",
    "Why is the sky blue?", "How can I sleep better?", "What is the best way to learn to cook?",
    "Describe a busy train station.", "What would you take to an island?",
)
UNTUNED_GERMAN = (
    "Warum fliegen Vögel im Winter nach Süden?", "Wie koche ich ein Ei?", "Was war der schönste Tag deiner Woche?",
    "Erkläre, wie ein Fahrrad funktioniert.", "Welches Buch soll ich als nächstes lesen?",
    "Wo gehst du gern spazieren?", "Kannst du deine Heimatstadt beschreiben?", "Was macht einen guten Lehrer aus?",
    "Wie trinken Pflanzen Wasser?", "Welche Jahreszeit magst du am liebsten und warum?",
    "Sag mir, wie man einen Baum pflanzt.", "Wer hat das Telefon erfunden?", "Was passiert, wenn es schneit?",
    "Wie verbringe ich einen verregneten Sonntag?", "Wovon träumen Hunde?", "Warum ist der Himmel blau?",
    "Wie kann ich besser schlafen?", "Wie lernt man am besten kochen?", "Beschreibe einen vollen Bahnhof.",
    "Was würdest du auf eine Insel mitnehmen?",
)


def main() -> int:
    from models.recipe.corpus import LANGUAGE_NAMES
    from models.recipe.language_steering import PROMPTS_FOR_TARGET, clamp_value, measure
    from steerserve.serve_process import ServeProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url")
    parser.add_argument("--api-key", default=KEY)
    parser.add_argument("--multipliers", default="3", help="clamp values as multiples of the feature's mean activation")
    parser.add_argument("--examples", type=int, default=2, help="answers to print per target language")
    parser.add_argument("--prompts", choices=("tuned", "untuned"), default="tuned",
                        help="the prompt set the default model's build was checked with, or a second one nobody "
                             "tuned to")
    args = parser.parse_args()
    prompt_sets = PROMPTS_FOR_TARGET if args.prompts == "tuned" else {
        target: (lang, UNTUNED_GERMAN if lang == "de" else UNTUNED_ENGLISH)
        for target, (lang, _) in PROMPTS_FOR_TARGET.items()}
    report = json.loads((MODEL / "build_report.json").read_text())
    server = None
    if args.base_url is None:
        work = Path(tempfile.mkdtemp(prefix="steerserve-lang-"))
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        server = ServeProcess([str(MODEL), "--config", str(ROOT / "configs" / "default.yaml"), "--sae", str(MODEL / "sae"),
                               "--feature-labels", str(MODEL / "sae" / "labels.jsonl"), "--api-key", KEY,
                               "--data-dir", str(work / "data")], work / "server.log", env=env, cwd=ROOT)
        print(f"server ready in {server.wait_ready(900):.0f}s")
    base_url = args.base_url or server.base_url
    try:
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {args.api_key}"}) as http:
            print(f"{'target':>8} {'feature':>8} {'value':>6} {'prompts':>8} {'unsteered: prompt lang':>23} "
                  f"{'steered: target lang':>21}")
            for target, (prompt_lang, prompts) in prompt_sets.items():
                name = LANGUAGE_NAMES[target]
                hits = http.get("/v1/features/search", params={"q": name}).raise_for_status().json()["data"]
                # a language's name labels its best feature at every layer: steer the one that qualifies
                qualifying = [int(layer) for layer, found in report["labels"]["language_features"].items()
                              if found[target]["qualifies"]]
                hit = next((h for h in hits if h["label"] == name and h["layer"] in qualifying), hits[0])
                for multiplier in (float(m) for m in args.multipliers.split(",")):
                    value = clamp_value(report, hit["layer"], target, multiplier)
                    result = measure(base_url, NAME, hit["layer"], hit["index"], value, target, prompts=prompts,
                                     api_key=args.api_key)
                    print(f"{target:>8} {hit['layer']}:{hit['index']:<6} {value:>6g} {prompt_lang:>8} "
                          f"{result.share('unsteered', prompt_lang):>23.0%} {result.share('steered', target):>21.0%}")
                    for example in result.examples[: args.examples]:
                        print(f"           {json.dumps(example, ensure_ascii=False)}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
