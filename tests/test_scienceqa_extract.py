"""Robust ScienceQA option-letter extraction (paper Appendix E.1): vlmq.lmms.scienceqa."""

from __future__ import annotations

import pytest

from vlmq.lmms.scienceqa import extract_option_letter

CHOICES = ["a magnet", "a rubber band", "a glass marble", "a wooden spoon"]

MATCH = [
    ("B", "B"),
    ("b", "B"),
    ("(C)", "C"),
    ("A.", "A"),
    ("  D  ", "D"),
    ("The answer is B.", "B"),
    ("the answer is (C)", "C"),
    ("Answer: A", "A"),
    ("**Answer:** D", "D"),
    ("The correct answer is option B.", "B"),
    ("The correct option is C because magnets attract iron.", "C"),
    ("B. a rubber band", "B"),
    ("(A) a magnet", "A"),
    ("C) a glass marble", "C"),
    ("I choose D.", "D"),
    ("I would go with option A", "A"),
    ("Option C is correct.", "C"),
    ("B is the correct answer.", "B"),
    ("Looking at the picture, the magnet pulls the nail, so the answer is A.", "A"),
    ("The image shows a nail stuck to it, so (A).", "A"),
    ("The answer is B. Option A is wrong because rubber does not conduct.", "B"),
    ("A is right.", "A"),
    ("It is a wooden spoon.", "D"),           # content cue: the one option text named
    ("a glass marble", "C"),
    ("Answer: b", "B"),
    ("The answer is: (B) a rubber band.", "B"),
    ("The correct answer is B, not A.", "B"),
    ("The answer is a magnet", "A"),         # content cue, not the article "a"
]

NO_MATCH = [
    "",
    "I don't know",
    "I do not know.",
    "Both are wrong",
    "None of the above",
    "Apple",
    "An Apple is red",
    "A dog is sitting on the grass.",         # article, not an option
    "The answer is A or B.",                  # ambiguous: two letters
    "Either A or C could be correct.",
    "The answer is A. Actually, the answer is C.",  # two different asserted letters
    "A, B",
    "The answer is not A.",                   # negated
    "The answer is F.",                       # not an option of a 4-choice question
    "Z",
    "It could be a magnet or a rubber band.",  # two option texts
    "B and C",
    "Neither A nor B",
    "It is not B.",
]


@pytest.mark.parametrize("response,expected", MATCH)
def test_extracts_letter(response, expected):
    assert extract_option_letter(response, CHOICES) == expected


@pytest.mark.parametrize("response", NO_MATCH)
def test_no_letter(response):
    assert extract_option_letter(response, CHOICES) is None


def test_without_choices_valid_letters_default_to_five():
    assert extract_option_letter("The answer is E.") == "E"
    assert extract_option_letter("The answer is F.") is None
    assert extract_option_letter("The answer is F.", n_options=6) == "F"
    assert extract_option_letter("It is a wooden spoon.") is None  # no content cue without choices


def test_none_and_non_string():
    assert extract_option_letter(None) is None
    assert extract_option_letter(3) is None


def test_nested_option_texts_are_not_ambiguous():
    assert extract_option_letter("dark red", ["red", "dark red", "blue"]) == "B"


def test_counts():
    assert len(MATCH) + len(NO_MATCH) >= 20


def test_robust_scienceqa_task_scoring():
    """The vlmq_scienceqa_img task scores "The answer is B." as correct; lmms-eval's built-in
    scienceqa_img rule does not."""
    from lmms_eval import utils as lmms_utils
    from lmms_eval.tasks.scienceqa.utils import sqa_process_results

    from vlmq.lmms import TASKS_DIR

    cfg = lmms_utils.load_yaml_config(str(TASKS_DIR / "vlmq_scienceqa" / "vlmq_scienceqa_img.yaml"))
    assert cfg["task"] == "vlmq_scienceqa_img" and cfg["dataset_name"] == "ScienceQA-IMG"
    process = cfg["process_results"]
    doc = {"hint": "", "question": "Which object is magnetic?", "choices": CHOICES, "answer": 1, "image": None}
    assert cfg["doc_to_target"](doc) == "B"
    for response, score in [("The answer is B.", 1.0), ("B", 1.0), ("(B) a rubber band", 1.0),
                            ("The answer is A.", 0.0), ("A or B", 0.0), ("I don't know", 0.0)]:
        assert process(doc, [response]) == {"exact_match": score}
    assert sqa_process_results(doc, ["The answer is B."]) == {"exact_match": 0.0}
