"""The demo visual-QA dataset: questions of five skills about rendered scenes.

Skills (the ``skill`` column):

* ``color``    - "What color is the triangle?" -> ``red``
* ``count``    - "How many blue shapes are there?" -> ``2``
* ``position`` - "Is the red circle in the left or right half of the image?" -> ``left``
* ``text``     - "What does the text say?" -> ``K7B2`` (a code of several characters)
* ``mcq``      - ScienceQA-style lettered multiple choice over the above -> ``C``

Splits (Parquet written by HF ``datasets`` with an ``Image`` feature):

* ``train`` - one row per image; ``question``/``answer``/``skill`` are lists (one question of every
  skill that the scene admits), so training can put several turns about one image in a sequence.
* ``calib`` - one row per image: instruction ("Describe the image.") and a short caption answer,
  like the COCO-caption calibration set of the paper; ``skill`` = ``caption``.
* ``eval``  - one row per question, skills balanced; scenes disjoint from train and calib.
* ``val``   - like ``eval`` (its own seed stream), scenes disjoint from train, calib and eval: the
  split on which settings are chosen, so that ``eval`` is read once, for the chosen setting.

Every row also carries ``scene`` (JSON of what was drawn), the ground truth of its answers.
Everything is a pure function of the seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlmq.demo.render import COLORS, SHAPES, Scene, render, sample_scene

SKILLS: tuple[str, ...] = ("color", "count", "position", "text", "mcq")
COUNT_KINDS: tuple[str, ...] = ("all", "color", "shape")  # all shapes / shapes of a colour / of a shape
LETTERS = "ABCD"
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class SceneSpec:
    """Knobs of scene sampling and rendering."""

    grid: int = 8
    cell: int = 28
    min_objects: int = 1
    max_objects: int = 6
    min_code: int = 3
    max_code: int = 4
    jitter: int = 3
    count_kinds: tuple[str, ...] = COUNT_KINDS  # what "How many ...?" questions count (count and mcq)

    def sample(self, rng: random.Random) -> Scene:
        return sample_scene(rng, self.grid, self.min_objects, self.max_objects, self.min_code,
                            self.max_code, self.jitter)


QA = tuple[str, str]


def _unique_shape_objects(scene: Scene) -> list:
    counts = {s: sum(o.shape == s for o in scene.objects) for s in SHAPES}
    return [o for o in scene.objects if counts[o.shape] == 1]


def _unique_color_objects(scene: Scene) -> list:
    counts = {c: sum(o.color == c for o in scene.objects) for c in COLORS}
    return [o for o in scene.objects if counts[o.color] == 1]


def q_color(scene: Scene, rng: random.Random, spec: SceneSpec = SceneSpec()) -> QA | None:
    cands = _unique_shape_objects(scene)
    if not cands:
        return None
    o = rng.choice(cands)
    q = rng.choice(["What color is the {s}?", "What is the color of the {s}?"]).format(s=o.shape)
    return q, o.color


def _count_question(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = COUNT_KINDS) -> tuple[str, int]:
    kind = rng.choice(list(kinds)) if len(kinds) > 1 else kinds[0]
    if kind == "all":
        return "How many shapes are there?", len(scene.objects)
    if kind == "color":
        c = rng.choice(list(COLORS))
        return f"How many {c} shapes are there?", sum(o.color == c for o in scene.objects)
    s = rng.choice(SHAPES)
    return f"How many {s}s are there?", sum(o.shape == s for o in scene.objects)


def q_count(scene: Scene, rng: random.Random, spec: SceneSpec = SceneSpec()) -> QA | None:
    q, n = _count_question(scene, rng, spec.count_kinds)
    return q, str(n)


def q_position(scene: Scene, rng: random.Random, spec: SceneSpec = SceneSpec()) -> QA | None:
    o = rng.choice(list(scene.objects))
    half = scene.grid / 2
    if rng.random() < 0.5:
        return f"Is the {o.name} in the left or right half of the image?", "left" if o.col < half else "right"
    return f"Is the {o.name} in the top or bottom half of the image?", "top" if o.row < half else "bottom"


def q_text(scene: Scene, rng: random.Random, spec: SceneSpec = SceneSpec()) -> QA | None:
    q = rng.choice(["What does the text say?", "Read the text in the image."])
    return q, scene.code


def format_mcq(question: str, options: list[str]) -> str:
    """ScienceQA-style prompt: question, lettered options, instruction."""
    opts = " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"Question: {question}\nOptions: {opts}\n{MCQ_SUFFIX}"


def q_mcq(scene: Scene, rng: random.Random, spec: SceneSpec = SceneSpec()) -> QA | None:
    kind = rng.choice(["color", "count", "shape"])
    if kind == "color":
        cands = _unique_shape_objects(scene)
        if not cands:
            return None
        o = rng.choice(cands)
        question, right = f"What color is the {o.shape}?", o.color
        wrong = rng.sample([c for c in COLORS if c != right], 3)
    elif kind == "count":
        question, n = _count_question(scene, rng, spec.count_kinds)
        right = str(n)
        wrong = [str(k) for k in rng.sample([k for k in range(7) if k != n], 3)]
    else:
        cands = _unique_color_objects(scene)
        if not cands:
            return None
        o = rng.choice(cands)
        question, right = f"What shape is the {o.color} object?", o.shape
        wrong = [x for x in SHAPES if x != right]
    options = wrong + [right]
    rng.shuffle(options)
    return format_mcq(question, options), LETTERS[options.index(right)]


# Question templates that the training-only targets parse back (``m[1]``: what the question names).
COLOR_Q = re.compile(r"What (?:color is|is the color of) the (\w+)\?")
POSITION_Q = re.compile(r"Is the (\w+ \w+) in the (?:left or right|top or bottom) half of the image\?")
SHAPE_Q = re.compile(r"What shape is the (\w+) object\?")
COUNT_ALL_Q = re.compile(r"How many (shapes) are there\?")
COUNT_COLOR_Q = re.compile(r"How many (\w+) shapes are there\?")
COUNT_SHAPE_Q = re.compile(r"How many (\w+)s are there\?")


QUESTION_MAKERS: dict[str, Callable[[Scene, random.Random, SceneSpec], QA | None]] = {
    "color": q_color,
    "count": q_count,
    "position": q_position,
    "text": q_text,
    "mcq": q_mcq,
}
CAPTION_INSTRUCTIONS = ("Describe the image.", "Write a short caption.")


def caption(scene: Scene, rng: random.Random) -> QA:
    """Short COCO-style caption of a scene (instruction, caption)."""
    n = len(scene.objects)
    if rng.random() < 0.5:
        cap = f"{n} shapes and the text {scene.code}"
    else:
        cap = f"the text {scene.code} and {n} shapes"
    return rng.choice(CAPTION_INSTRUCTIONS), cap


def _objects_in(scene: Scene, sel) -> list[int]:
    return [o.row * scene.grid + o.col for o in scene.objects if sel(o)]


def attention_targets(scene: Scene, question: str, answer: str,
                      count_target: str = "vision_end") -> list[tuple[list[int], list[int]]] | None:
    """Where a model should look to produce each answer token (a training-only signal).

    One entry per answer token that has a target: ``(cells_head0, cells_head1)``, lists of image
    cells (row-major) or ``-1`` for the ``<|vision_end|>`` token.
    The text skill's k-th character looks at the k-th code cell; everything else at the cells of
    the objects the question names. Counts: ``count_target="vision_end"`` looks at
    ``<|vision_end|>`` only (which carries the counts); ``"objects"`` at the counted objects' cells
    *and* ``<|vision_end|>`` (spread evenly, the share left on ``<|vision_end|>`` is 1/(n+1), from
    which n can be read off).
    ``None`` where the question has no target (e.g. it names nothing drawn).
    """

    q = question.split("\n")[0].removeprefix("Question: ")  # multiple choice: the question line
    if q in ("What does the text say?", "Read the text in the image."):
        return [([c], [c]) for c in (scene.code_row * scene.grid + scene.code_col + i for i in range(len(answer)))]
    if q.startswith("How many"):
        if count_target == "vision_end":
            return [([-1], [-1])]
        cells = [o.row * scene.grid + o.col for o in counted_objects(scene, q)] + [-1]
        return [(cells, cells)]
    if m := COLOR_Q.fullmatch(q):
        cells = _objects_in(scene, lambda o: o.shape == m[1])
        return [(cells, cells)] if cells else None
    if m := POSITION_Q.fullmatch(q):
        cells = _objects_in(scene, lambda o: o.name == m[1])
        return [(cells, cells)] if cells else None
    if m := SHAPE_Q.fullmatch(q):
        cells = _objects_in(scene, lambda o: o.color == m[1])
        return [(cells, cells)] if cells else None
    return None


def counted_objects(scene: Scene, question: str) -> list:
    """The objects a "How many ...?" question counts."""

    if COUNT_ALL_Q.fullmatch(question):
        return list(scene.objects)
    if m := COUNT_COLOR_Q.fullmatch(question):
        return [o for o in scene.objects if o.color == m[1]]
    if m := COUNT_SHAPE_Q.fullmatch(question):
        return [o for o in scene.objects if o.shape == m[1]]
    raise ValueError(f"not a count question: {question!r}")


def question_key_spans(question: str) -> list[tuple[int, int]]:
    """Character spans, in ``question``, of the words its answer depends on (what the question
    names: the shape of a colour question, the colour + shape of a position question, the colour
    of a shape question, the counted category), inside a multiple-choice prompt too; ``[]`` for
    questions that name nothing (read the text)."""

    off, q = 0, question
    if q.startswith("Question: "):
        off = len("Question: ")
        q = q[off:].split("\n")[0]
    for pat in (COLOR_Q, POSITION_Q, SHAPE_Q, COUNT_ALL_Q, COUNT_COLOR_Q, COUNT_SHAPE_Q):
        if m := pat.fullmatch(q):
            return [(off + m.start(1), off + m.end(1))]
    return []


def option_spans(question: str) -> list[tuple[int, int, int]]:
    """``(letter index, start, end)`` character spans, in ``question``, of every option's text of
    a multiple-choice prompt (``format_mcq``); ``[]`` for other questions."""

    if not question.startswith("Question: "):
        return []
    line_start = question.index("\nOptions: ") + len("\nOptions: ")
    line = question[line_start:].split("\n")[0]
    marks = list(re.finditer(r"(?:^| )([A-D])\. ", line))
    out = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(line)
        out.append((LETTERS.index(m[1]), line_start + m.end(), line_start + end))
    return out


LATENTS: dict[str, int] = {"row": 0, "col": 0, "count": 7,
                           "color": len(COLORS), "shape": len(SHAPES)}  # 0 = the grid size


def answer_latents(scene: Scene, question: str, answer: str) -> tuple[dict[str, int], int | None]:
    """Intermediate quantities an answer is computed from (a training-only signal at the first
    answer token): the row and column of the object of a position question, the count, the colour
    (and shape) asked about; for a multiple-choice question also the character offset in the
    question of the correct option's text (where the letter can be read off), else ``None``.
    """

    q, opt_at = question, None
    if q.startswith("Question: "):
        head, opts = q.split("\n")[0], q.split("\n")[1]
        m = re.search(rf"{answer}\. ", opts)
        opt_at = len(head) + 1 + m.end()
        q = head.removeprefix("Question: ")
        if m := SHAPE_Q.fullmatch(q):
            o = next(o for o in scene.objects if o.color == m[1])
            return {"shape": SHAPES.index(o.shape)}, opt_at
    if q.startswith("How many"):
        return {"count": min(len(counted_objects(scene, q)), LATENTS["count"] - 1)}, opt_at
    if m := COLOR_Q.fullmatch(q):
        o = next(o for o in scene.objects if o.shape == m[1])
        return {"color": list(COLORS).index(o.color)}, opt_at
    if m := POSITION_Q.fullmatch(q):
        o = next(o for o in scene.objects if o.name == m[1])
        return {"row": o.row, "col": o.col}, opt_at
    return {}, opt_at


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def scene_key(scene: Scene) -> str:
    return hashlib.sha1(json.dumps(scene.to_dict(), sort_keys=True).encode()).hexdigest()


def split_rng(seed: int, split: str) -> random.Random:
    """Independent, reproducible random stream per split (str seeding is hash-stable)."""
    return random.Random(f"vlmq-demo/{seed}/{split}")


def make_train_rows(n_images: int, seed: int, spec: SceneSpec) -> dict[str, list]:
    rng = split_rng(seed, "train")
    rows: dict[str, list] = {"image_id": [], "image": [], "question": [], "answer": [], "skill": [], "scene": []}
    for i in range(n_images):
        scene = spec.sample(rng)
        qs, ans, sk = [], [], []
        for skill in SKILLS:
            qa = QUESTION_MAKERS[skill](scene, rng, spec)
            if qa is not None:
                qs.append(qa[0]), ans.append(qa[1]), sk.append(skill)
        rows["image_id"].append(f"train-{i:06d}")
        rows["image"].append({"bytes": png_bytes(render(scene, spec.cell)), "path": None})
        rows["question"].append(qs)
        rows["answer"].append(ans)
        rows["skill"].append(sk)
        rows["scene"].append(json.dumps(scene.to_dict(), sort_keys=True))
    return rows


def make_calib_rows(n_images: int, seed: int, spec: SceneSpec) -> dict[str, list]:
    rng = split_rng(seed, "calib")
    rows: dict[str, list] = {"image_id": [], "image": [], "question": [], "answer": [], "skill": [], "scene": []}
    for i in range(n_images):
        scene = spec.sample(rng)
        q, a = caption(scene, rng)
        rows["image_id"].append(f"calib-{i:06d}")
        rows["image"].append({"bytes": png_bytes(render(scene, spec.cell)), "path": None})
        rows["question"].append(q)
        rows["answer"].append(a)
        rows["skill"].append("caption")
        rows["scene"].append(json.dumps(scene.to_dict(), sort_keys=True))
    return rows


def make_eval_rows(per_skill: int, seed: int, spec: SceneSpec, exclude: set[str],
                   split: str = "eval") -> dict[str, list]:
    """``per_skill`` questions of every skill, each on its own fresh scene not in ``exclude``
    (``split``: the seed stream and the image id prefix, ``eval`` or ``val``)."""
    rng = split_rng(seed, split)
    rows: dict[str, list] = {"image_id": [], "image": [], "question": [], "answer": [], "skill": [], "scene": []}
    for i in range(per_skill * len(SKILLS)):
        skill = SKILLS[i % len(SKILLS)]
        while True:
            scene = spec.sample(rng)
            if scene_key(scene) in exclude:
                continue
            qa = QUESTION_MAKERS[skill](scene, rng, spec)
            if qa is not None:
                break
        rows["image_id"].append(f"{split}-{i:06d}")
        rows["image"].append({"bytes": png_bytes(render(scene, spec.cell)), "path": None})
        rows["question"].append(qa[0])
        rows["answer"].append(qa[1])
        rows["skill"].append(skill)
        rows["scene"].append(json.dumps(scene.to_dict(), sort_keys=True))
    return rows


def _features(listy: bool):
    from datasets import Features, Image, List, Value

    text = List(Value("string")) if listy else Value("string")
    return Features({"image_id": Value("string"), "image": Image(), "question": text, "answer": text,
                     "skill": text, "scene": Value("string")})


def write_split(rows: dict[str, list], path: str | Path) -> Path:
    """Write rows as Parquet through ``datasets`` (Image feature), atomically."""
    from datasets import Dataset

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    listy = bool(rows["question"]) and isinstance(rows["question"][0], list)
    ds = Dataset.from_dict(rows, features=_features(listy))
    tmp = path.with_name(path.name + ".tmp")
    ds.to_parquet(str(tmp))
    os.replace(tmp, path)
    return path


def build_splits(out_dir: str | Path, seed: int, n_train: int, n_calib: int, eval_per_skill: int,
                 spec: SceneSpec, val_per_skill: int = 0) -> dict[str, Path]:
    """Generate and write ``train``, ``calib``, ``eval`` (and, with ``val_per_skill``, ``val``)
    Parquet files under ``out_dir``. Adding ``val`` leaves the other splits byte-identical."""
    out_dir = Path(out_dir)
    train = make_train_rows(n_train, seed, spec)
    calib = make_calib_rows(n_calib, seed, spec)
    seen = {scene_key(Scene.from_dict(json.loads(s))) for s in train["scene"] + calib["scene"]}
    evl = make_eval_rows(eval_per_skill, seed, spec, seen)
    out = {
        "train": write_split(train, out_dir / "train.parquet"),
        "calib": write_split(calib, out_dir / "calib.parquet"),
        "eval": write_split(evl, out_dir / "eval.parquet"),
    }
    if val_per_skill:
        seen |= {scene_key(Scene.from_dict(json.loads(s))) for s in evl["scene"]}
        out["val"] = write_split(make_eval_rows(val_per_skill, seed, spec, seen, split="val"), out_dir / "val.parquet")
    return out


def load_split(path: str | Path):
    """The split as a ``datasets.Dataset`` (``image`` decodes to PIL)."""
    from datasets import Dataset

    return Dataset.from_parquet(str(path))


def read_rows(path: str | Path) -> list[dict]:
    """Rows as plain dicts, images left as PNG bytes (fast path for training, no cache files)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    out = table.to_pylist()
    for r in out:
        r["image"] = r["image"]["bytes"]
    return out
