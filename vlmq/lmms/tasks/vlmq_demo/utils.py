"""lmms-eval task ``vlmq_demo``: the demo visual-QA eval split (local Parquet, exact match).

Scoring: the greedy answer and the reference are whitespace/case-normalised and compared
exactly (the same rule as ``vlmq.demo.evaluate.exact_match``). ``exact_match`` is the accuracy
over all questions; ``acc_<skill>`` the accuracy over one skill's questions.
"""

from __future__ import annotations

import io

SKILLS = ("color", "count", "position", "text", "mcq")


def normalize(text: str) -> str:
    return " ".join(str(text).strip().split()).lower()


def doc_to_visual(doc):
    image = doc["image"]
    if isinstance(image, dict):  # undecoded {"bytes", "path"}
        from PIL import Image

        image = Image.open(io.BytesIO(image["bytes"]))
    return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    pred = results[0] if results else ""
    correct = float(normalize(pred) == normalize(doc["answer"]))
    out = {"exact_match": correct}
    for skill in SKILLS:
        out[f"acc_{skill}"] = {"skill": doc["skill"], "correct": correct, "id": doc["image_id"]}
    return out


def _skill_mean(skill: str, items) -> float:
    vals = [it["correct"] for it in items if it["skill"] == skill]
    return sum(vals) / len(vals) if vals else float("nan")


def acc_color(items):
    return _skill_mean("color", items)


def acc_count(items):
    return _skill_mean("count", items)


def acc_position(items):
    return _skill_mean("position", items)


def acc_text(items):
    return _skill_mean("text", items)


def acc_mcq(items):
    return _skill_mean("mcq", items)
