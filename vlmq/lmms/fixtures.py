"""Fixture datasets of the paper's eight lmms-eval benchmarks, in their real formats.

For each of ChartQA, DocVQA val, MME-RealWorld en/cn, OCRBench, ScienceQA-IMG, SEED-Bench-2-Plus
and TextVQA val, :func:`build_fixture_cache` writes a tiny dataset (a few rows, images rendered
by the demo renderer :mod:`vlmq.demo.render`, nothing downloaded) with the Hub id, config, split
and features that lmms-eval 0.7.3's task YAML and ``utils.py`` read, laid out the way ``datasets``
caches a downloaded Hub dataset::

    <cache_dir>/<namespace>___<snake_case(name)>/<config>/0.0.0/<hash>/
        dataset_info.json  <snake_case(name)>-<split>.arrow

(``<cache_dir>`` = ``$HF_HOME/datasets``; ``<hash>`` is the Hub commit of a real download, a
fixed fake one here). With ``HF_DATASETS_OFFLINE=1`` ``datasets.load_dataset(<Hub id>, <config>)``
- what lmms-eval calls - then loads them as if the real ones had been fetched, so the whole
evaluation path (task configs, prompts, scoring, aggregation) runs offline. The scores mean
nothing: it is a rehearsal of the plumbing.

Where each schema comes from (docs/evaluation.md lists the same): the task YAML (Hub id, config,
split) and ``utils.py`` of lmms-eval 0.7.3 (the columns read), lmms-eval's ``upload_*.py`` scripts
(ChartQA, OCRBench features) and the ``dataset_info`` of the datasets' Hub cards (DocVQA,
ScienceQA, SEED-Bench-2-Plus, TextVQA via lmms-lab's copies). MME-RealWorld's card publishes no
schema; its columns and types are those ``lmms_eval/tasks/mme_realworld/utils.py`` reads.

Command line (build the fixture cache under an HF home, e.g. to rehearse a run by hand)::

    python -m vlmq.lmms.fixtures --hf-home /tmp/hf-rehearsal [--rows 6] [--tasks chartqa,ocrbench]
"""

from __future__ import annotations

import base64
import hashlib
import random
import tempfile
from pathlib import Path
from typing import Callable

from vlmq.demo.render import COLORS, SHAPES, Scene, render, sample_scene
from vlmq.lmms.hf_cache import DatasetRef, cache_root, task_dataset

# The paper's eight benchmarks as lmms-eval task names, and the task YAML that defines each
# (relative to lmms_eval/tasks); vlmq_scienceqa_img reads the same dataset as scienceqa_img.
PAPER_TASK_YAML = {
    "chartqa": "chartqa/chartqa.yaml",
    "docvqa_val": "docvqa/docvqa_val.yaml",
    "mmerealworld": "mme_realworld/mme_realworld.yaml",
    "mmerealworld_cn": "mme_realworld/mme_realworld_cn.yaml",
    "ocrbench": "ocrbench/ocrbench.yaml",
    "scienceqa_img": "scienceqa/scienceqa_img.yaml",
    "seedbench_2_plus": "seedbench_2_plus/seedbench_2_plus.yaml",
    "textvqa_val": "textvqa/textvqa_val.yaml",
}
ALIASES = {"vlmq_scienceqa_img": "scienceqa_img"}
FAKE_VERSION = "0.0.0"  # what the Parquet builder of a Hub download writes


def paper_dataset(task: str) -> DatasetRef:
    """The dataset lmms-eval 0.7.3's YAML gives one of the eight paper tasks (read from the file)."""
    import lmms_eval
    from lmms_eval.utils import load_yaml_config

    base = ALIASES.get(task, task)
    if base not in PAPER_TASK_YAML:
        raise ValueError(f"no fixture for task {task!r} (known: {sorted(PAPER_TASK_YAML)})")
    cfg = load_yaml_config(str(Path(lmms_eval.__file__).parent / "tasks" / PAPER_TASK_YAML[base]), mode="simple")
    ref = task_dataset(cfg, task)
    assert ref is not None, task
    return ref


# ------------------------------------------------------------------------------ writing the cache
def write_cached(cache_dir: str | Path, ref: DatasetRef, rows: dict[str, list], features) -> Path:
    """Write ``rows`` as the cached download of ``ref`` (Parquet file -> ``datasets``' Parquet
    builder, the builder a real Hub download goes through) and return its directory."""
    from datasets import Dataset
    from datasets.packaged_modules.parquet.parquet import Parquet

    config = ref.name or "default"
    fake_commit = hashlib.sha1(f"vlmq-fixture/{ref.path}/{config}".encode()).hexdigest()
    target = cache_root(cache_dir, ref.path) / config / FAKE_VERSION / fake_commit
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{ref.split}-00000-of-00001.parquet"
        Dataset.from_dict(rows, features=features).to_parquet(str(src))
        builder = Parquet(cache_dir=str(Path(tmp) / "build"), dataset_name=ref.path.rpartition("/")[2],
                          config_name=config, hash=fake_commit, data_files={ref.split: [str(src)]},
                          features=features)
        builder.download_and_prepare(output_dir=str(target))
    return target


# ------------------------------------------------------------------------------ rows per task
def _scene(rng: random.Random) -> Scene:
    return sample_scene(rng, grid=4, min_objects=1, max_objects=3, min_code=3, max_code=4, jitter=2)


def _png(img) -> bytes:
    from vlmq.demo.data import png_bytes

    return png_bytes(img)


def _qa(scene: Scene, i: int) -> tuple[str, str]:
    """A question about the scene and its answer (alternating: read the code / count shapes)."""
    if i % 2 == 0:
        return "What does the text say?", scene.code
    return "How many shapes are there?", str(len(scene.objects))


def _mc(scene: Scene, rng: random.Random, n_options: int) -> tuple[str, list[str], int]:
    """A lettered multiple-choice question (count of shapes): question, option texts, correct index."""
    n = len(scene.objects)
    opts = sorted(rng.sample([k for k in range(0, 9) if k != n], n_options - 1) + [n])
    return "How many shapes are there?", [str(k) for k in opts], opts.index(n)


def _images(task: str, n: int, seed: int, cell: int):
    rng = random.Random(f"vlmq-fixture/{seed}/{task}")
    for i in range(n):
        scene = _scene(rng)
        yield i, rng, scene, render(scene, cell)


def _chartqa(n, seed, cell):
    from datasets import Features, Image, Value

    feats = Features({"type": Value("string"), "question": Value("string"), "answer": Value("string"),
                      "image": Image()})
    rows = {k: [] for k in feats}
    for i, _, scene, img in _images("chartqa", n, seed, cell):
        q, a = _qa(scene, i + 1)
        rows["type"].append("human_test" if i % 2 == 0 else "augmented_test")
        rows["question"].append(q)
        rows["answer"].append(a)
        rows["image"].append(img)
    return rows, feats


def _docvqa(n, seed, cell):
    from datasets import Features, Image, Sequence, Value

    feats = Features({"questionId": Value("string"), "question": Value("string"),
                      "question_types": Sequence(Value("string")), "image": Image(), "docId": Value("int64"),
                      "ucsf_document_id": Value("string"), "ucsf_document_page_no": Value("string"),
                      "answers": Sequence(Value("string")), "data_split": Value("string")})
    rows = {k: [] for k in feats}
    for i, _, scene, img in _images("docvqa_val", n, seed, cell):
        q, a = _qa(scene, i)
        rows["questionId"].append(str(49153 + i))
        rows["question"].append(q)
        rows["question_types"].append(["form"] if i % 2 == 0 else ["layout", "others"])
        rows["image"].append(img)
        rows["docId"].append(14465 + i)
        rows["ucsf_document_id"].append(f"fixture{i:04d}")
        rows["ucsf_document_page_no"].append("1")
        rows["answers"].append([a, a.lower()])
        rows["data_split"].append("val")
    return rows, feats


_MME_CATEGORIES = [("Perception/Monitoring", "counting/vehicle"),
                   ("Perception/OCR with Complex Context", "character recognition/license"),
                   ("Reasoning/Diagram and Table", "diagram"),
                   ("Perception/Remote Sensing", "object counting"),
                   ("Reasoning/Autonomous_Driving", "intention/ego"),
                   ("Perception/Monitoring", "attribute/color")]


def _mme(task, cn):
    def build(n, seed, cell):
        from datasets import Features, Sequence, Value

        feats = Features({"index": Value("int64"), "question": Value("string"),
                          "multi-choice options": Sequence(Value("string")), "answer": Value("string"),
                          "category": Value("string"), "l2-category": Value("string"), "bytes": Value("string")})
        rows = {k: [] for k in feats}
        for i, rng, scene, img in _images(task, n, seed, cell):
            _, opts, k = _mc(scene, rng, 5)
            rows["index"].append(1000 + i)
            rows["question"].append("图中有多少个形状？" if cn else "How many shapes are in the image?")
            rows["multi-choice options"].append([f"({'ABCDE'[j]}) {o}" for j, o in enumerate(opts)])
            rows["answer"].append("ABCDE"[k])
            cat, l2 = _MME_CATEGORIES[i % len(_MME_CATEGORIES)]
            rows["category"].append(cat)
            rows["l2-category"].append(l2)
            rows["bytes"].append(base64.b64encode(_png(img)).decode("ascii"))
        return rows, feats
    return build


_OCRBENCH_KINDS = [("IIIT5K", "Regular Text Recognition"), ("ESTVQA", "Scene Text-centric VQA"),
                   ("HME100k", "Handwritten Mathematical Expression Recognition"),
                   ("FUNSD", "Key Information Extraction"), ("docVQA", "Doc-oriented VQA"),
                   ("WordArt", "Artistic Text Recognition")]


def _ocrbench(n, seed, cell):
    from datasets import Features, Image, Sequence, Value

    feats = Features({"dataset": Value("string"), "question": Value("string"), "question_type": Value("string"),
                      "answer": Sequence(Value("string")), "image": Image()})
    rows = {k: [] for k in feats}
    for i, _, scene, img in _images("ocrbench", n, seed, cell):
        ds, qtype = _OCRBENCH_KINDS[i % len(_OCRBENCH_KINDS)]
        q, a = _qa(scene, i)
        rows["dataset"].append(ds)
        rows["question"].append(q)
        rows["question_type"].append(qtype)
        rows["answer"].append([a])
        rows["image"].append(img)
    return rows, feats


def _scienceqa(n, seed, cell):
    from datasets import Features, Image, Sequence, Value

    feats = Features({"image": Image(), "question": Value("string"), "choices": Sequence(Value("string")),
                      "answer": Value("int8"), "hint": Value("string"), "task": Value("string"),
                      "grade": Value("string"), "subject": Value("string"), "topic": Value("string"),
                      "category": Value("string"), "skill": Value("string"), "lecture": Value("string"),
                      "solution": Value("string")})
    rows = {k: [] for k in feats}
    for i, rng, scene, img in _images("scienceqa_img", n, seed, cell):
        o = scene.objects[0]
        if i % 2 == 0:  # 2-4 options, like ScienceQA
            q, opts, k = _mc(scene, rng, 2 + i % 3)
        else:
            opts = rng.sample([c for c in COLORS if c != o.color], 2) + [o.color]
            rng.shuffle(opts)
            q, k = f"What color is the {o.shape} in the image?", opts.index(o.color)
        rows["image"].append(img)
        rows["question"].append(q)
        rows["choices"].append(opts)
        rows["answer"].append(k)
        rows["hint"].append("" if i % 3 else "The image shows coloured shapes.")
        rows["task"].append("closed choice")
        rows["grade"].append("grade2")
        rows["subject"].append("natural science")
        rows["topic"].append("shapes")
        rows["category"].append("Identify shapes")
        rows["skill"].append("Count and name shapes")
        rows["lecture"].append("")
        rows["solution"].append(f"The answer is {opts[k]}.")
    return rows, feats


def _seedbench(n, seed, cell):
    from datasets import Features, Image, Value

    names = ["data_id", "question_id", "question_image_type", "question_image_subtype", "question",
             "choice_A", "choice_B", "choice_C", "choice_D", "answer", "data_source", "data_type", "level",
             "subpart", "version"]
    feats = Features({**{k: Value("string") for k in names}, "image": Image()})
    rows = {k: [] for k in feats}
    kinds = ["chart", "map", "web"]
    for i, rng, scene, img in _images("seedbench_2_plus", n, seed, cell):
        q, opts, k = _mc(scene, rng, 4)
        kind = kinds[i % 3]
        vals = {"data_id": f"{kind}/fixture_{i}.png", "question_id": str(i), "question_image_type": kind,
                "question_image_subtype": "fixture", "question": q, "answer": "ABCD"[k],
                "data_source": "SEED-Bench v2 plus", "data_type": "Single Image", "level": "L1",
                "subpart": "Single-Image & Text Comprehension", "version": "v2+"}
        vals.update({f"choice_{'ABCD'[j]}": o for j, o in enumerate(opts)})
        for key in names:
            rows[key].append(vals[key])
        rows["image"].append(img)
    return rows, feats


def _textvqa(n, seed, cell):
    from datasets import Features, Image, Sequence, Value

    feats = Features({"image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
                      "question_tokens": Sequence(Value("string")), "image": Image(),
                      "image_width": Value("int32"), "image_height": Value("int32"),
                      "flickr_original_url": Value("string"), "flickr_300k_url": Value("string"),
                      "answers": Sequence(Value("string")), "image_classes": Sequence(Value("string")),
                      "set_name": Value("string"), "ocr_tokens": Sequence(Value("string"))})
    rows = {k: [] for k in feats}
    for i, _, scene, img in _images("textvqa_val", n, seed, cell):
        q, a = _qa(scene, i)
        q = q.lower()  # TextVQA's questions are lower case (its doc_to_text capitalises them)
        rows["image_id"].append(hashlib.sha1(_png(img)).hexdigest()[:16])
        rows["question_id"].append(34602 + i)
        rows["question"].append(q)
        rows["question_tokens"].append(q.rstrip("?").split())
        rows["image"].append(img)
        rows["image_width"].append(img.width)
        rows["image_height"].append(img.height)
        rows["flickr_original_url"].append("")
        rows["flickr_300k_url"].append("")
        rows["answers"].append([a.lower()] * 10)  # ten annotators, as in TextVQA
        rows["image_classes"].append(sorted({o.shape for o in scene.objects if o.shape in SHAPES}))
        rows["set_name"].append("val")
        rows["ocr_tokens"].append([scene.code.lower()])
    return rows, feats


BUILDERS: dict[str, Callable] = {
    "chartqa": _chartqa,
    "docvqa_val": _docvqa,
    "mmerealworld": _mme("mmerealworld", cn=False),
    "mmerealworld_cn": _mme("mmerealworld_cn", cn=True),
    "ocrbench": _ocrbench,
    "scienceqa_img": _scienceqa,
    "seedbench_2_plus": _seedbench,
    "textvqa_val": _textvqa,
}


def fixture_rows(task: str, n_rows: int = 6, seed: int = 0, cell: int = 28):
    """``(rows, features)`` of one task's fixture: ``n_rows`` rows, images ``4 * cell`` px square."""
    return BUILDERS[ALIASES.get(task, task)](n_rows, seed, cell)


def build_fixture_cache(cache_dir: str | Path, tasks=tuple(PAPER_TASK_YAML), n_rows: int = 6, seed: int = 0,
                        cell: int = 28) -> dict[str, Path]:
    """Write the fixture dataset of every task in ``tasks`` into the ``datasets`` cache
    ``cache_dir`` (``$HF_HOME/datasets``); returns ``{task: cached directory}``."""
    out: dict[str, Path] = {}
    for task in tasks:
        ref = paper_dataset(task)
        rows, feats = fixture_rows(task, n_rows, seed, cell)
        out[task] = write_cached(cache_dir, ref, rows, feats)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    ap = argparse.ArgumentParser(description="Write the paper tasks' fixture datasets into an HF datasets cache.")
    ap.add_argument("--hf-home", default=os.environ.get("HF_HOME"), help="HF home (the cache is <hf-home>/datasets)")
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--tasks", default=",".join(PAPER_TASK_YAML))
    a = ap.parse_args(argv)
    if not a.hf_home:
        ap.error("--hf-home (or HF_HOME) is required")
    for task, path in build_fixture_cache(Path(a.hf_home) / "datasets", a.tasks.split(","), a.rows).items():
        print(f"{task}: {path}")


if __name__ == "__main__":
    main()
