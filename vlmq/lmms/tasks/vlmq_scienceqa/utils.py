"""lmms-eval task ``vlmq_scienceqa_img``: lmms-eval's ``scienceqa_img`` (same data, prompt and
target) scored with the robust option-letter extraction of paper Appendix E.1
(:func:`vlmq.lmms.scienceqa.extract_option_letter`) instead of the built-in "bare letter or
'X.' prefix" rule."""

from __future__ import annotations

from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_target, sqa_doc_to_text, sqa_doc_to_visual  # noqa: F401

from vlmq.lmms.scienceqa import extract_option_letter


def process_results(doc, results):
    target = sqa_doc_to_target(doc)
    letter = extract_option_letter(results[0] if results else "", doc["choices"])
    return {"exact_match": float(letter == target)}
