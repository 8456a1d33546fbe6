"""The demo visual-QA dataset: determinism, skills, answers consistent with the drawn scene."""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlmq.demo.data import LETTERS, SKILLS, SceneSpec, build_splits, read_rows
from vlmq.demo.render import BACKGROUNDS, COLORS, SHAPES, Scene

SPEC = SceneSpec()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return build_splits(out, seed=3, n_train=40, n_calib=12, eval_per_skill=12, spec=SPEC)


def test_same_seed_same_bytes(splits, tmp_path):
    again = build_splits(tmp_path, seed=3, n_train=40, n_calib=12, eval_per_skill=12, spec=SPEC)
    for name in ("train", "calib", "eval"):
        assert _sha(splits[name]) == _sha(again[name]), name


def test_other_seed_other_data(splits, tmp_path):
    other = build_splits(tmp_path, seed=4, n_train=40, n_calib=12, eval_per_skill=12, spec=SPEC)
    assert _sha(splits["eval"]) != _sha(other["eval"])


def test_schema_and_skills(splits):
    from datasets import Image as ImageFeature

    from vlmq.demo.data import load_split

    ds = load_split(splits["eval"])
    assert isinstance(ds.features["image"], ImageFeature)
    assert set(ds.column_names) >= {"image", "question", "answer", "skill", "scene"}
    ev = read_rows(splits["eval"])
    assert {r["skill"] for r in ev} == set(SKILLS)
    assert [sum(r["skill"] == s for r in ev) for s in SKILLS] == [12] * len(SKILLS)
    tr = read_rows(splits["train"])
    assert set(s for r in tr for s in r["skill"]) == set(SKILLS)
    assert {r["skill"] for r in read_rows(splits["calib"])} == {"caption"}


def test_eval_scenes_disjoint_from_train(splits):
    seen = {r["scene"] for n in ("train", "calib") for r in read_rows(splits[n])}
    assert not seen & {r["scene"] for r in read_rows(splits["eval"])}


def _occupied_cells(img: Image.Image, scene: Scene) -> set[tuple[int, int]]:
    a = np.asarray(img).astype(int)
    bg = np.array(BACKGROUNDS[scene.background])
    c = SPEC.cell
    out = set()
    for r in range(scene.grid):
        for k in range(scene.grid):
            if (np.abs(a[r * c:(r + 1) * c, k * c:(k + 1) * c] - bg).sum(-1) > 30).any():
                out.add((r, k))
    return out


def _expected(scene: Scene, question: str) -> str | None:
    """Answer recomputed from the scene for the single (non-MCQ) question templates."""
    objs = scene.objects
    if m := re.fullmatch(r"What (?:color is|is the color of) the (\w+)\?", question):
        (o,) = [o for o in objs if o.shape == m[1]]
        return o.color
    if question == "How many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(o.color == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o.shape == m[1] for o in objs))
    if m := re.fullmatch(r"Is the (\w+ \w+) in the (left or right|top or bottom) half of the image\?", question):
        (o,) = [o for o in objs if o.name == m[1]]
        # the shape's centre pixel against the image's centre line (independent of the cell arithmetic)
        x, y = (o.col + 0.5) * SPEC.cell, (o.row + 0.5) * SPEC.cell
        if m[2] == "left or right":
            return "left" if x < SPEC.grid * SPEC.cell / 2 else "right"
        return "top" if y < SPEC.grid * SPEC.cell / 2 else "bottom"
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o.color == m[1]]
        return o.shape
    if question in ("What does the text say?", "Read the text in the image."):
        return scene.code
    return None


def test_answers_match_the_drawn_scene(splits):
    rows = read_rows(splits["eval"]) + [
        {"image": r["image"], "scene": r["scene"], "question": q, "answer": a, "skill": s}
        for r in read_rows(splits["train"]) for q, a, s in zip(r["question"], r["answer"], r["skill"])
    ]
    for r in rows:
        scene = Scene.from_dict(json.loads(r["scene"]))
        img = Image.open(io.BytesIO(r["image"])).convert("RGB")
        assert img.size == (SPEC.grid * SPEC.cell,) * 2
        # the picture shows exactly the scene's objects and code characters, one per cell
        drawn = {(o.row, o.col) for o in scene.objects} | {(scene.code_row, scene.code_col + i)
                                                              for i in range(len(scene.code))}
        assert _occupied_cells(img, scene) == drawn
        for o in scene.objects:  # the colour at the shape's centre is its colour
            cx = o.col * SPEC.cell + SPEC.cell // 2 + max(-3, min(3, 0))
            cy = o.row * SPEC.cell + SPEC.cell // 2
            block = np.asarray(img)[cy - 6:cy + 7, cx - 6:cx + 7].reshape(-1, 3)
            assert any(tuple(p) == COLORS[o.color] for p in block)
        if r["skill"] == "mcq":
            q, opts, _ = r["question"].split("\n")
            options = dict(re.findall(r"([A-D])\. (.+?)(?= [A-D]\. |$)", opts.removeprefix("Options: ")))
            assert list(options) == list(LETTERS) and r["answer"] in options
            sub = q.removeprefix("Question: ")
            assert options[r["answer"]] == _expected(scene, sub)
            assert len(set(options.values())) == 4
        else:
            exp = _expected(scene, r["question"])
            assert exp is not None, r["question"]
            assert r["answer"] == exp
            if r["question"] == "How many shapes are there?":
                assert int(r["answer"]) == len(scene.objects)
        assert all(o.shape in SHAPES for o in scene.objects)


def test_attention_targets_point_at_what_the_answer_depends_on(splits):
    """The training-only attention targets name cells that hold exactly the things the question
    names (checked against the scene, independently of the target code's regexes)."""
    from vlmq.demo.data import attention_targets

    n_checked = 0
    for r in read_rows(splits["train"]):
        scene = Scene.from_dict(json.loads(r["scene"]))
        at = {(o.row * scene.grid + o.col): o for o in scene.objects}
        for q, a, skill in zip(r["question"], r["answer"], r["skill"]):
            t = attention_targets(scene, q, a)
            sub = q.split("\n")[0].removeprefix("Question: ")
            if skill == "text":
                assert [c for c, _ in t] == [[scene.code_row * scene.grid + scene.code_col + i] for i in range(len(a))]
            elif sub.startswith("How many"):
                assert t == [([-1], [-1])]  # counts are read at <|vision_end|>
            elif skill == "position":
                (h0, h1), = t
                named = re.search(r"Is the (\w+ \w+) in", q)[1]
                assert h0 == h1 and [at[c].name for c in h0] == [named]
            elif sub.startswith("What shape"):
                color = re.search(r"the (\w+) object\?", sub)[1]
                (h0, h1), = t
                assert h0 == h1 and [at[c].color for c in h0] == [color]
            elif sub.startswith("What"):
                shape = re.search(r"the (\w+)\?", sub)[1]
                (h0, h1), = t
                assert h0 == h1 and [at[c].shape for c in h0] == [shape]
            else:
                pytest.fail(f"no check for {q!r}")
            n_checked += 1
    assert n_checked > 100


def test_key_spans_name_what_the_answer_depends_on(splits):
    """The words the routing supervision points at: checked against the scene (the named thing
    picks out the objects that give the answer), independently of the span code's regexes."""
    from vlmq.demo.data import question_key_spans

    n = 0
    for r in read_rows(splits["train"]):
        scene = Scene.from_dict(json.loads(r["scene"]))
        for q, a, skill in zip(r["question"], r["answer"], r["skill"]):
            spans = question_key_spans(q)
            if skill == "text":
                assert spans == []
                continue
            (c0, c1), = spans
            word = q[c0:c1]
            if skill == "mcq":
                opts = dict(re.findall(r"([A-D])\. (.+?)(?= [A-D]\. |$)", q.split("\n")[1].removeprefix("Options: ")))
                a, q = opts[a], q.split("\n")[0].removeprefix("Question: ")
                assert c0 >= len("Question: ") and q[c0 - len("Question: "):c1 - len("Question: ")] == word
            if q.startswith("How many"):
                match = [o for o in scene.objects
                         if word == "shapes" and "many shapes" in q or word in (o.color, o.shape)]
                assert len(match) == int(a), (q, word)
            elif " or " in q:  # position: the colour + shape of one object
                (o,), = [[o for o in scene.objects if o.name == word]]
                assert a in (("left" if o.col < scene.grid / 2 else "right") if "left" in q else
                             ("top" if o.row < scene.grid / 2 else "bottom"))
            elif word in SHAPES:  # colour question: the one object of that shape has the answer colour
                (o,), = [[o for o in scene.objects if o.shape == word]]
                assert o.color == a
            else:  # shape question: the one object of that colour has the answer shape
                assert word in COLORS
                (o,), = [[o for o in scene.objects if o.color == word]]
                assert o.shape == a
            n += 1
    assert n > 100


def test_count_kinds_restricts_what_count_questions_count(tmp_path):
    """``count_kinds=("all",)``: every count question (and every counting multiple choice) asks for
    all shapes, and its answer is the number of shapes drawn."""
    import random

    from vlmq.demo.data import q_count, q_mcq

    spec = SceneSpec(count_kinds=("all",), max_objects=4)
    rng = random.Random(int(np.random.SeedSequence().entropy % 10_000))
    seen_mcq = 0
    for _ in range(200):
        scene = spec.sample(rng)
        q, a = q_count(scene, rng, spec)
        assert q == "How many shapes are there?" and a == str(len(scene.objects))
        qa = q_mcq(scene, rng, spec)
        if qa and qa[0].startswith("Question: How many"):
            seen_mcq += 1
            head, opts = qa[0].split("\n")[:2]
            assert head == "Question: How many shapes are there?"
            letter_text = dict(re.findall(r"([A-D])\. (\S+)", opts))
            assert letter_text[qa[1]] == str(len(scene.objects))
    assert seen_mcq > 20
    mixed = SceneSpec()
    kinds = {q_count(mixed.sample(rng), rng, mixed)[0].split()[2] for _ in range(100)}
    assert len(kinds) > 2  # the default asks per colour and per shape too


def test_val_split_disjoint_and_leaves_the_others_unchanged(splits, tmp_path):
    with_val = build_splits(tmp_path, seed=3, n_train=40, n_calib=12, eval_per_skill=12, spec=SPEC, val_per_skill=6)
    for name in ("train", "calib", "eval"):
        assert _sha(splits[name]) == _sha(with_val[name]), name
    val = read_rows(with_val["val"])
    assert [sum(r["skill"] == s for r in val) for s in SKILLS] == [6] * len(SKILLS)
    assert all(r["image_id"].startswith("val-") for r in val)
    seen = {r["scene"] for n in ("train", "calib", "eval") for r in read_rows(with_val[n])}
    assert not seen & {r["scene"] for r in val}
