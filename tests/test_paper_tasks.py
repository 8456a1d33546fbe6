"""The paper's eight lmms-eval benchmarks, rehearsed offline on fixture datasets in their real
formats (vlmq.lmms.fixtures): the evaluate stage with ``eval.tasks: paper`` on the demo model (FP
and an RTN run), every task's metric parsed into result.json / per_question.parquet, the report's
Table-2 layout, robust ScienceQA scoring, and the one-line error for a dataset missing from the
cache (before any model is loaded). The scores mean nothing; the plumbing is what is checked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

os.environ["VLMQ_NO_PREFECT"] = "1"

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "data" / "demo" / "model"
LIMIT = 2
LABELS = ["ChartQA", "DocVQA", "MME-RW (en)", "MME-RW (cn)", "OCRBench", "SQA-IMG", "SEED-2-Plus", "TextVQA"]


@pytest.fixture(scope="module")
def fixture_hf_home(tmp_path_factory) -> Path:
    """An HF home whose datasets cache holds the eight fixture datasets (6 rows each)."""
    from vlmq.lmms.fixtures import build_fixture_cache

    home = tmp_path_factory.mktemp("hf_home")
    build_fixture_cache(home / "datasets", n_rows=6)
    return home


@pytest.fixture
def use_hf_home(monkeypatch):
    """``use_hf_home(dir)``: lmms-eval's dataset cache becomes ``dir/datasets``, offline (lmms-eval
    resolves that directory once per process, so its memo is cleared before and after)."""
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

    def use(home: Path) -> Path:
        monkeypatch.setenv("HF_HOME", str(home))
        for var in ("HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE"):
            monkeypatch.delenv(var, raising=False)
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            assert os.environ.get(var) == "1"
        _resolve_hf_datasets_cache_dir.cache_clear()
        return home

    yield use
    _resolve_hf_datasets_cache_dir.cache_clear()


@pytest.fixture
def hf_home(fixture_hf_home, use_hf_home):
    """lmms-eval's dataset cache is the fixture cache."""
    return use_hf_home(fixture_hf_home)


def _rtn_state(model_dir: Path, state: Path, run: str, bits: int = 3, group_size: int = 128) -> None:
    """A finished quantize state (RTN solved weights + summary), without the quantize stage."""
    from safetensors.torch import save_file

    from vlmq.models import load_model
    from vlmq.quant import rtn

    model, _, adapter = load_model(model_dir)
    for l, layer in enumerate(adapter.decoder_layers(model)):
        t = {}
        for n in adapter.linear_names:
            q, s, z, g = rtn(adapter.get_linear(layer, n).weight, bits, group_size)
            t.update({f"{n}.int_weight": q, f"{n}.scales": s, f"{n}.zeros": z, f"{n}.g_idx": g})
        (state / f"layer_{l:03d}").mkdir(parents=True)
        save_file(t, str(state / f"layer_{l:03d}" / "solved.safetensors"))
    (state / "summary.json").write_text(json.dumps({"run": run}))


def test_fixtures_have_the_real_layout_and_schemas(hf_home):
    """Each fixture is what `load_dataset(<Hub id>, <config>)` returns offline for the task's
    YAML: the task's split, with the columns (and types) its utils.py reads."""
    import datasets

    from vlmq.lmms.fixtures import PAPER_TASK_YAML, paper_dataset
    from vlmq.lmms.hf_cache import find_cached

    expect = {  # columns lmms-eval 0.7.3's utils.py / YAML read, with their types
        "chartqa": {"type": "string", "question": "string", "answer": "string", "image": "Image"},
        "docvqa_val": {"questionId": "string", "question": "string", "answers": "List", "image": "Image"},
        "mmerealworld": {"index": "int64", "question": "string", "multi-choice options": "List",
                         "answer": "string", "category": "string", "l2-category": "string", "bytes": "string"},
        "ocrbench": {"dataset": "string", "question": "string", "question_type": "string", "answer": "List",
                     "image": "Image"},
        "scienceqa_img": {"image": "Image", "question": "string", "choices": "List", "answer": "int8",
                          "hint": "string"},
        "seedbench_2_plus": {"question": "string", "choice_A": "string", "choice_D": "string", "answer": "string",
                             "question_image_type": "string", "question_id": "string", "image": "Image"},
        "textvqa_val": {"question": "string", "question_id": "int32", "answers": "List", "ocr_tokens": "List",
                        "image": "Image"},
    }
    expect["mmerealworld_cn"] = expect["mmerealworld"]
    assert set(expect) == set(PAPER_TASK_YAML)
    for task, cols in expect.items():
        ref = paper_dataset(task)
        cached = find_cached(hf_home / "datasets", ref)
        assert cached is not None and cached.parts[-3] == (ref.name or "default") and cached.parts[-2] == "0.0.0"
        ds = datasets.load_dataset(ref.path, ref.name, cache_dir=str(hf_home / "datasets"))
        assert list(ds) == [ref.split], task
        feats = ds[ref.split].features
        for col, kind in cols.items():
            f = feats[col]
            got = getattr(f, "dtype", None) if type(f).__name__ == "Value" else type(f).__name__
            assert got == kind, (task, col, f)
        assert 5 <= ds[ref.split].num_rows <= 10
    assert paper_dataset("docvqa_val").name == "DocVQA" and paper_dataset("scienceqa_img").name == "ScienceQA-IMG"


def test_paper_tasks_end_to_end(tmp_path, hf_home, monkeypatch):
    from stages.evaluate import PER_QUESTION_COLUMNS, evaluate
    from stages.params import PAPER_TASKS
    from stages.report import report

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # lmms-eval's side files must not land in the working directory
    state = tmp_path / "quantize"
    _rtn_state(DEMO_MODEL, state, "rtn-w3g128")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"path": str(DEMO_MODEL)},
        "eval": {"tasks": "paper", "limit": LIMIT, "batch_size": 4, "max_new_tokens": 4},
    }))
    out = tmp_path / "eval"
    results = evaluate(params, out_dir=out, state_dir=state)
    assert set(results) == {"fp", "rtn-w3g128"}
    assert not list(work.iterdir())

    for run in results:
        res = json.loads((out / run / "result.json").read_text())
        assert res["tasks"] == PAPER_TASKS and set(res["per_task"]) == set(PAPER_TASKS)
        assert res["n_per_task"] == {t: LIMIT for t in PAPER_TASKS} and res["n"] == 8 * LIMIT
        df = pd.read_parquet(out / run / "per_question.parquet")
        assert list(df.columns) == PER_QUESTION_COLUMNS and len(df) == 8 * LIMIT
        assert df["correct"].notna().all() and df["prediction"].notna().all() and df["target"].notna().all()
        for task in PAPER_TASKS:
            score, per_q = res["per_task"][task], df.loc[df["task"] == task, "correct"]
            assert isinstance(score, float) and 0.0 <= score <= 1.0, (run, task, score)
            # the headline score is the aggregation of the per-question values (OCRBench: out of 1000)
            agg = per_q.sum() / 1000 if task == "ocrbench" else per_q.mean()
            assert score == pytest.approx(agg), (run, task)
            assert df.loc[df["task"] == task, "question_id"].is_unique
        assert res["accuracy"] == pytest.approx(sum(res["per_task"].values()) / 8)
        lmms = json.loads((out / run / "lmms_eval_results.json").read_text())
        assert set(lmms["results"]) == set(PAPER_TASKS)
        for task in PAPER_TASKS:
            assert len((out / run / f"samples_{task}.jsonl").read_text().splitlines()) == LIMIT
        mme = json.loads((out / run / "samples_mmerealworld.jsonl").read_text().splitlines()[0])
        assert mme["doc"]["bytes"].endswith("characters omitted>")  # base64 images are not logged
        assert (out / run / "lmms_eval_files" / "results" / "ocrbench_results.txt").is_file()

    # the report: Table 2 with the eight benchmarks in the paper's order and the average
    quant = tmp_path / "quant_reports"
    quant.mkdir()
    (quant / "rtn-w3g128.json").write_text(json.dumps({"method": "rtn", "bits": 3, "group_size": 128}))
    report(out, quant, tmp_path / "reports", tmp_path / "no_importance", tmp_path / "no_cache")
    md = (tmp_path / "reports" / "summary.md").read_text().splitlines()
    head = "| " + " | ".join(["method", "g", *LABELS, "avg", "answer NLL", "KL to FP"]) + " |"
    assert head in md, "\n".join(md)
    at = md.index(head)
    for line, run in zip(md[at + 2: at + 4], ("fp", "rtn-w3g128")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == run
        res = json.loads((out / run / "result.json").read_text())
        want = [f"{100 * res['per_task'][t]:.1f}" for t in PAPER_TASKS] + [f"{100 * res['accuracy']:.1f}"]
        assert cells[2:11] == want
    assert "No score" not in "\n".join(md)
    csv = pd.read_csv(tmp_path / "reports" / "summary.csv")
    assert [c for c in csv.columns if c.startswith("task:")] == [f"task:{t}" for t in PAPER_TASKS]


class _Scripted:
    """An lmms-eval model that answers ScienceQA questions with scripted free-form sentences."""

    FORMS = ["The answer is {L}.", "{L}", "The answer is {W}.", "Answer: ({L})", "{L}. {T}", "the correct option is {L}"]

    @classmethod
    def make(cls):
        from lmms_eval.api.model import lmms

        forms = cls.FORMS

        class Scripted(lmms):
            def generate_until(self, requests):
                out = []
                for r in requests:
                    _, _, _, doc_id, task, split = r.args[:6]
                    doc = self.task_dict[task][split][doc_id]
                    k, n = doc["answer"], len(doc["choices"])
                    out.append(forms[doc_id % len(forms)].format(L="ABCDE"[k], W="ABCDE"[(k + 1) % n],
                                                                  T=doc["choices"][k]))
                return out

            def loglikelihood(self, requests):
                raise NotImplementedError

            def generate_until_multi_round(self, requests):
                raise NotImplementedError

        return Scripted()


def test_scienceqa_robust_extraction_on_the_fixture(tmp_path, hf_home, monkeypatch):
    """``eval.scienceqa_robust_extraction: true`` runs vlmq_scienceqa_img on the ScienceQA fixture;
    "The answer is B."-style answers count there and not in lmms-eval's own scienceqa_img."""
    from stages.evaluate import _setup, evaluate, run_lmms_eval
    from stages.params import load_params
    from vlmq.lmms.fixtures import fixture_rows

    monkeypatch.chdir(tmp_path)
    n = 6
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"path": str(DEMO_MODEL)},
                                      "eval": {"tasks": ["scienceqa_img"], "scienceqa_robust_extraction": True,
                                               "limit": n, "max_new_tokens": 4}}))
    p = load_params(params)
    specs, rows, tm = _setup(p, None)
    assert specs == ["vlmq_scienceqa_img"] and rows is None
    res = run_lmms_eval(_Scripted.make(), specs + ["scienceqa_img"], p, tm, side_dir=tmp_path / "side")["results"]

    # independent expectation from the fixture rows and the scripted forms
    docs, _ = fixture_rows("scienceqa_img", n_rows=n)
    forms = [_Scripted.FORMS[i % len(_Scripted.FORMS)] for i in range(n)]
    robust = [0.0 if "{W}" in f else 1.0 for f in forms]  # every form names the right letter but one
    builtin = [1.0 if f in ("{L}", "{L}. {T}") else 0.0 for f in forms]
    assert len(docs["answer"]) == n
    assert res["vlmq_scienceqa_img"]["exact_match,none"] == pytest.approx(sum(robust) / n)
    assert res["scienceqa_img"]["exact_match,none"] == pytest.approx(sum(builtin) / n)
    assert sum(robust) > sum(builtin)

    # and the stage itself, on the demo model (FP only): the robust task's score lands in result.json
    out = tmp_path / "eval"
    evaluate(params, out_dir=out, runs=("fp",))
    res = json.loads((out / "fp" / "result.json").read_text())
    assert list(res["per_task"]) == ["vlmq_scienceqa_img"] and res["n"] == n
    df = pd.read_parquet(out / "fp" / "per_question.parquet")
    assert res["per_task"]["vlmq_scienceqa_img"] == pytest.approx(df["correct"].mean())


def test_missing_dataset_is_one_line_before_the_model_loads(tmp_path, fixture_hf_home, use_hf_home, monkeypatch,
                                                            capsys):
    from stages.common import run_cli
    from stages.evaluate import main
    from vlmq.lmms import loaders

    home = tmp_path / "hf_home"
    shutil.copytree(fixture_hf_home, home)
    shutil.rmtree(home / "datasets" / "lmms-lab-encoder___chart_qa")
    use_hf_home(home)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the dataset check")

    monkeypatch.setattr(loaders, "load", no_model)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"path": str(DEMO_MODEL)}, "eval": {"tasks": "paper", "limit": 1}}))
    with pytest.raises(SystemExit) as exc:
        run_cli(main, ["--params", str(params), "--runs", "fp", "--out", str(tmp_path / "eval")])
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: eval.tasks: ") and "Traceback" not in stderr, stderr
    assert "task 'chartqa'" in err[0] and "lmms-lab-encoder/ChartQA" in err[0] and str(home / "datasets") in err[0]
    assert "ocrbench" not in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "eval").exists()
