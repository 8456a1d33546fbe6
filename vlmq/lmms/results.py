"""Reading lmms-eval's results: one headline score per task and per-question rows.

lmms-eval keys its aggregate metrics as ``"<metric>,<filter>"`` (e.g. ``"exact_match,none"``)
and logs one sample per question (``doc_id``, ``filtered_resps``, ``target``, the per-question
metric values). Every headline score below is a fraction in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

# Headline metric of each task (the paper's tables), all fractions in [0, 1].
PRIMARY_METRIC = {
    "vlmq_demo": "exact_match",
    "vlmq_scienceqa_img": "exact_match",
    "scienceqa_img": "exact_match",
    "chartqa": "relaxed_overall",
    "docvqa_val": "anls",
    "mmerealworld": "mme_realworld_score",
    "mmerealworld_cn": "mme_realworld_score",
    "ocrbench": "ocrbench_accuracy",
    "seedbench_2_plus": "seedbench_2_plus_all",
    "textvqa_val": "exact_match",
}
# Column headings of the paper's Table 2 (reports/summary.md), per lmms-eval task.
TASK_LABELS = {
    "chartqa": "ChartQA",
    "docvqa_val": "DocVQA",
    "mmerealworld": "MME-RW (en)",
    "mmerealworld_cn": "MME-RW (cn)",
    "ocrbench": "OCRBench",
    "scienceqa_img": "SQA-IMG",
    "vlmq_scienceqa_img": "SQA-IMG (robust)",
    "seedbench_2_plus": "SEED-2-Plus",
    "textvqa_val": "TextVQA",
}
SKILL_PREFIX = "acc_"  # vlmq_demo's per-skill metrics: acc_color, acc_count, ...
_ID_KEYS = ("question_id", "questionId", "id", "index")  # vlmq_demo: image_id (one question per image)
_SKILL_KEYS = ("skill", "category", "question_type")


def _metrics(task_result: dict) -> dict[str, Any]:
    """``{metric: value}`` of one task (filter ``none`` preferred; stderr entries dropped)."""
    out: dict[str, Any] = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr" in key:
            continue
        metric, filt = key.split(",", 1)
        if metric not in out or filt == "none":
            out[metric] = value
    return out


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return None if math.isnan(float(x)) else float(x)


def task_score(task: str, task_result: dict) -> float | None:
    """The task's headline score (its primary metric; else its first numeric metric)."""
    metrics = _metrics(task_result)
    if task in PRIMARY_METRIC and PRIMARY_METRIC[task] in metrics:
        return _number(metrics[PRIMARY_METRIC[task]])
    for value in metrics.values():
        if _number(value) is not None:
            return _number(value)
    return None


def per_skill(task_result: dict) -> dict[str, float]:
    """``{skill: accuracy}`` from ``acc_<skill>`` metrics (skills with no question left out)."""
    out = {}
    for metric, value in _metrics(task_result).items():
        if metric.startswith(SKILL_PREFIX) and _number(value) is not None:
            out[metric[len(SKILL_PREFIX):]] = float(value)
    return out


def summarize(results: dict) -> dict:
    """``{"accuracy": mean over tasks, "per_task": {...}, "per_skill": {...}}`` of a
    ``simple_evaluate`` result (``per_skill`` only from tasks that report skills)."""
    per_task, skills = {}, {}
    for task, res in results["results"].items():
        per_task[task] = task_score(task, res)
        for skill, acc in per_skill(res).items():
            skills[skill if len(results["results"]) == 1 else f"{task}/{skill}"] = acc
    scores = [v for v in per_task.values() if v is not None]
    return {"accuracy": sum(scores) / len(scores) if scores else None, "per_task": per_task, "per_skill": skills}


def question_value(value) -> float | None:
    """One question's value of a task's headline metric: the number itself, or, for the tasks whose
    per-question metric is a record their aggregation scores (lmms-eval 0.7.3's rules): OCRBench
    ``{"score": 0/1, ...}``; MME-RealWorld ``{"pred_answer", "answer", ...}`` (correct when the
    answer equals or is contained in the extracted letter, case-insensitive); SEED-Bench-2-Plus
    ``{"pred", "answer", ...}`` (equal after strip, case-insensitive)."""
    if isinstance(value, dict):
        if "score" in value:
            return _number(value["score"])
        if "pred_answer" in value and "answer" in value:
            pred, ans = str(value["pred_answer"]).lower(), str(value["answer"]).lower()
            return float(pred == ans or ans in pred)
        if "pred" in value and "answer" in value:
            return float(str(value["pred"]).lower().strip() == str(value["answer"]).lower().strip())
        return None
    return _number(value)


def sample_rows(task: str, samples: list[dict]) -> list[dict]:
    """Per-question rows of one task: ``task, doc_id, question_id, skill, correct, prediction,
    target`` (``correct``: the question's value of the primary metric, :func:`question_value`)."""
    metric = PRIMARY_METRIC.get(task, "exact_match")
    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc = s.get("doc") or {}
        keys = ("image_id",) if task == "vlmq_demo" else _ID_KEYS
        qid = next((doc[k] for k in keys if k in doc and doc[k] is not None), s["doc_id"])
        skill = next((doc[k] for k in _SKILL_KEYS if isinstance(doc.get(k), str)), None)
        pred = s.get("filtered_resps", [None])
        pred = pred[0] if isinstance(pred, list) and pred else pred
        rows.append({"task": task, "doc_id": int(s["doc_id"]), "question_id": str(qid), "skill": skill,
                     "correct": question_value(s.get(metric)), "prediction": None if pred is None else str(pred),
                     "target": None if s.get("target") is None else str(s["target"])})
    return rows
