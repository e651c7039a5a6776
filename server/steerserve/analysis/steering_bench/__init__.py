"""`steerserve bench-steering`: does steering a concept work, against simply asking for it?

Modules: `inputs` (concepts and instructions JSONL), `methods` (what each concept is steered
with, at which strengths), `judges` (an LLM judge at any OpenAI-compatible endpoint, or offline
judges on the served model itself), `scoring` (AxBench's harmonic mean, the selection/report
split, chosen strengths, bootstrap intervals), `runner` (the command), `report` (summary.json,
report.md, plots).
"""
