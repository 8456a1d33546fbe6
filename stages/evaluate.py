"""Stage ``evaluate``: the FP model and the quantize run on the configured lmms-eval tasks.

Both models are evaluated with lmms-eval's ``simple_evaluate`` (model type ``vlmq``,
``vlmq.lmms``; tasks from ``vlmq/lmms/tasks`` and lmms-eval's built-ins, ``eval.tasks``),
fully offline. On the demo benchmark (task ``vlmq_demo``) every question also gets the
teacher-forced NLL of its reference answer and KL(FP || quantized) of the answer-token
distributions (``vlmq.demo.evaluate``). Writes, per run (``fp`` and the quantize run's name,
e.g. ``vlmq-w3g128``), atomically:

* ``reports/eval/<run>/lmms_eval_results.json`` - lmms-eval's results (without samples);
* ``reports/eval/<run>/samples_<task>.jsonl`` - lmms-eval's logged samples;
* ``reports/eval/<run>/lmms_eval_files/`` - files tasks write while aggregating (if any);
* ``reports/eval/<run>/per_question.parquet`` - one row per question (schema in
  docs/evaluation.md);
* ``reports/eval/<run>/result.json`` - accuracy (mean over tasks), per task, per skill,
  answer NLL, KL to FP, n.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from stages.common import atomic_path, call, get_logger, model_path, run_cli, stage_parser, stage_timer, write_json, write_parquet
from stages.params import Params, load_params, run_name
from vlmq.state import STATE_DIR

OUT_DIR = Path("reports/eval")
STATE = STATE_DIR
DEMO_TASK = "vlmq_demo"
PER_QUESTION_COLUMNS = ["task", "doc_id", "question_id", "skill", "correct", "prediction", "target",
                        "answer_nll", "kl_to_fp"]


def task_specs(params: Params, dataset_cache: str | None = None) -> list:
    """lmms-eval task arguments: names, with ``vlmq_demo``'s data file set to ``eval.demo_eval``."""
    specs: list = []
    for task in params.eval.task_list():
        if task == DEMO_TASK:
            kwargs = {"data_files": {"test": str(Path(params.eval.demo_eval).resolve())}}
            if dataset_cache:
                kwargs["cache_dir"] = str(dataset_cache)
            specs.append({"task": DEMO_TASK, "dataset_kwargs": kwargs})
        else:
            specs.append(task)
    return specs


def demo_rows(params: Params) -> list[dict]:
    """The demo eval rows lmms-eval evaluates (the first ``eval.limit``), images as PNG bytes."""
    from vlmq.demo.data import read_rows

    path = Path(params.eval.demo_eval)
    if not path.is_file():
        raise FileNotFoundError(f"eval.demo_eval: {path} does not exist (build it with `python -m stages.demo_data`)")
    rows = read_rows(path)
    return rows[: params.eval.limit] if params.eval.limit else rows


class _OnDevice:
    """A processor whose outputs land on the model's device (``vlmq.demo.evaluate`` leaves them
    on the CPU); everything else is the wrapped processor's."""

    def __init__(self, processor, device):
        self._processor, self._device = processor, device

    def __call__(self, *args, **kwargs):
        return self._processor(*args, **kwargs).to(self._device)

    def __getattr__(self, name):
        return getattr(self._processor, name)


def answer_logprobs(model, processor, rows: list[dict], batch_size: int, desc: str):
    """Teacher-forced answer-token log-probs per question (``vlmq.demo.evaluate``), in batches."""
    from tqdm import tqdm

    from vlmq.demo.evaluate import answer_logprobs as _lp

    proc = _OnDevice(processor, next(model.parameters()).device)
    out = []
    for s in tqdm(range(0, len(rows), batch_size), desc=desc):
        out += _lp(model, proc, rows[s: s + batch_size], batch_size=batch_size)
    return out


def quant_run(params: Params, state_dir: Path) -> str:
    """Name of the finished quantize run in ``state_dir`` (its summary; else from the params)."""
    summary = state_dir / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{summary} is missing: the quantize stage has not finished "
                                f"(evaluate only the FP model with `--runs fp`)")
    return json.loads(summary.read_text()).get("run") or run_name(params)


def _jsonable(obj):
    """Plain JSON (lmms-eval's serializer for odd objects; NaN -> null)."""
    from lmms_eval.utils import handle_non_serializable

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(json.loads(json.dumps(obj, default=handle_non_serializable)))


def run_lmms_eval(lm, specs: list, params: Params, task_manager, side_dir: str | Path | None = None) -> dict:
    """lmms-eval's ``simple_evaluate``. Files some tasks write while aggregating (OCRBench's score
    breakdown, TextVQA's submission file) go under ``side_dir`` (lmms-eval's ``output_path``;
    without one they would land in the working directory)."""
    from types import SimpleNamespace

    from lmms_eval.evaluator import simple_evaluate

    cfg = params.eval
    cli_args = None if side_dir is None else SimpleNamespace(output_path=str(side_dir), process_with_media=True)
    return simple_evaluate(
        model=lm, tasks=copy.deepcopy(specs), task_manager=task_manager, limit=cfg.limit, cli_args=cli_args,
        batch_size=cfg.batch_size, log_samples=True, bootstrap_iters=0, verbosity="WARNING",
        gen_kwargs=f"max_new_tokens={cfg.max_new_tokens}" if cfg.max_new_tokens else None,
        random_seed=params.seed, numpy_random_seed=params.seed, torch_random_seed=params.seed,
        fewshot_random_seed=params.seed,
    )


def _evaluate_loaded(run: str, loaded, specs: list, params: Params, task_manager, rows: list[dict] | None,
                     fp_logprobs, out_dir: Path, log) -> tuple[dict, list | None]:
    """One model: lmms-eval + answer NLL/KL; writes ``out_dir/<run>/``. Returns (result, logprobs)."""
    from vlmq.demo.evaluate import nll_kl
    from vlmq.lmms.models.vlmq import VLMQModel
    from vlmq.lmms.results import sample_rows, summarize

    cfg = params.eval
    t0 = time.perf_counter()
    lm = VLMQModel(loaded=loaded, batch_size=cfg.batch_size, name=run)
    log.info("evaluate[%s]: lmms-eval on %s", run, ", ".join(params.eval.task_list()))
    side = Path(tempfile.mkdtemp(prefix=f"vlmq-{run}-lmms-"))
    try:
        results = run_lmms_eval(lm, specs, params, task_manager, side_dir=side)
        side_files = {p.relative_to(side): p.read_bytes() for p in sorted(side.rglob("*")) if p.is_file()}
    finally:
        shutil.rmtree(side, ignore_errors=True)
    if results is None or not results.get("results"):
        raise RuntimeError(f"evaluate[{run}]: lmms-eval returned no results")
    samples = results.pop("samples", {}) or {}
    table = [r for task in results["results"] for r in sample_rows(task, samples.get(task, []))]
    per_q = pd.DataFrame(table, columns=PER_QUESTION_COLUMNS[:-2])
    per_q["answer_nll"] = math.nan
    per_q["kl_to_fp"] = math.nan

    logprobs = None
    if rows is not None and DEMO_TASK in results["results"]:
        logprobs = answer_logprobs(loaded.model, loaded.processor, rows, cfg.batch_size, f"answer NLL [{run}]")
        nll, kl = nll_kl(logprobs, fp_logprobs)
        kl = [0.0] * len(nll) if fp_logprobs is None else kl
        demo = per_q["task"] == DEMO_TASK
        ids = per_q.loc[demo, "doc_id"].to_numpy()
        if [rows[i]["image_id"] for i in ids] != per_q.loc[demo, "question_id"].tolist():
            raise RuntimeError(f"evaluate[{run}]: lmms-eval's {DEMO_TASK} questions do not match {cfg.demo_eval}")
        per_q.loc[demo, "answer_nll"] = [nll[i] for i in ids]
        per_q.loc[demo, "kl_to_fp"] = [kl[i] for i in ids]

    summary = summarize(results)
    demo_q = per_q[per_q["task"] == DEMO_TASK]
    result = {
        "run": run,
        **summary,
        "answer_nll": float(demo_q["answer_nll"].mean()) if len(demo_q) else None,
        "kl_to_fp": float(demo_q["kl_to_fp"].mean()) if len(demo_q) else None,
        "n": int(len(per_q)),
        "n_per_task": {t: int(n) for t, n in per_q.groupby("task").size().items()},
        "tasks": list(results["results"]),
        "limit": cfg.limit,
        "model": lm.info,
        "lmms_eval_version": results.get("lmms_eval_version"),
        "seconds": time.perf_counter() - t0,
    }
    with atomic_path(out_dir / run) as tmp:
        tmp.mkdir()
        write_json(tmp / "lmms_eval_results.json", _jsonable(results))
        for task, task_samples in samples.items():
            with open(tmp / f"samples_{task}.jsonl", "w") as f:
                for s in _jsonable(task_samples):
                    f.write(json.dumps(_trim_doc(s)) + "\n")
        for rel, data in side_files.items():  # lmms-eval's own side files (submissions, breakdowns)
            (tmp / "lmms_eval_files" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "lmms_eval_files" / rel).write_bytes(data)
        write_parquet(per_q, tmp / "per_question.parquet")
        write_json(tmp / "result.json", _jsonable(result))
    log.info("evaluate[%s]: accuracy %s, per task %s, answer NLL %s, KL to FP %s (n=%d, %.1f s)", run,
             _fmt(result["accuracy"]), {k: _fmt(v) for k, v in result["per_task"].items()},
             _fmt(result["answer_nll"]), _fmt(result["kl_to_fp"]), result["n"], result["seconds"])
    return result, logprobs


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]{256,}")


def _trim_doc(sample: dict) -> dict:
    """A logged sample with base64 data in its document elided: lmms-eval drops ``Image`` columns
    from logged documents, but MME-RealWorld keeps its images as base64 text (``bytes``),
    megabytes per question."""
    doc = sample.get("doc")
    if isinstance(doc, dict):
        sample["doc"] = {k: (f"<base64, {len(v)} characters omitted>" if isinstance(v, str) and _BASE64.fullmatch(v)
                             else v) for k, v in doc.items()}
    return sample


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


@functools.lru_cache(maxsize=None)
def _task_manager():
    """lmms-eval's task index (built-ins + ``vlmq/lmms/tasks``): ~9 s to build, so once per process."""
    from lmms_eval.tasks import TaskManager

    from vlmq.lmms import TASKS_DIR

    return TaskManager("WARNING", include_path=str(TASKS_DIR))


def check_task_datasets(tasks: list[str], task_manager) -> None:
    """Fail before any model work when a task's Hugging Face dataset is not in the offline cache
    lmms-eval reads (one line naming each such task and its dataset id, config and split)."""
    from vlmq.lmms import hf_cache

    refs = hf_cache.task_datasets(task_manager, [t for t in tasks if t != DEMO_TASK])
    if not refs:
        return
    cache = hf_cache.datasets_cache_dir()
    absent = hf_cache.missing(refs, cache)
    if absent:
        raise FileNotFoundError(hf_cache.missing_message(absent, cache))


def _setup(params: Params, dataset_cache: str | None):
    """(task specs, demo rows or None, task manager), after checking the task names and that every
    task's data is at hand (before any model is loaded)."""
    from vlmq.lmms import quiet_logs

    quiet_logs()
    tasks = params.eval.task_list()
    task_manager = _task_manager()
    missing = [t for t in tasks if t not in task_manager.all_tasks]
    if missing:
        raise ValueError(f"eval.tasks: unknown lmms-eval task(s) {missing}")
    check_task_datasets(tasks, task_manager)
    rows = demo_rows(params) if DEMO_TASK in tasks else None
    return task_specs(params, dataset_cache), rows, task_manager


def fp_answer_logprobs(params: Params, rows: list[dict]):
    """The FP model's teacher-forced answer-token log-probs (the reference of ``kl_to_fp``)."""
    from vlmq.lmms.loaders import load

    loaded = load(params.model.path, loader="fp", dtype=params.model.dtype, device=params.model.device)
    return answer_logprobs(loaded.model, loaded.processor, rows, params.eval.batch_size, "answer NLL [fp]")


def evaluate_run(params: Params, state_dir: str | Path = STATE, run: str | None = None,
                 out_dir: str | Path = OUT_DIR, dataset_cache: str | None = None, fp_logprobs=None) -> dict:
    """Evaluate one finished quantize run (its state in ``state_dir``) into ``out_dir/<run>/``;
    returns its ``result.json`` content. The FP reference of ``kl_to_fp`` is recomputed unless
    ``fp_logprobs`` is given. (Used by the sweep flow, one call per branch.)"""
    from vlmq.lmms.loaders import load

    state_dir = Path(state_dir)
    run = run or quant_run(params, state_dir)
    log = get_logger("evaluate")
    specs, rows, task_manager = _setup(params, dataset_cache)
    if rows is not None and fp_logprobs is None:
        fp_logprobs = fp_answer_logprobs(params, rows)
    loaded = load(params.model.path, loader="fake_quant", quant_state=str(state_dir), dtype=params.model.dtype,
                  device=params.model.device)
    result, _ = _evaluate_loaded(run, loaded, specs, params, task_manager, rows, fp_logprobs, Path(out_dir), log)
    return result


def evaluate_fp(params: Params, out_dir: str | Path = OUT_DIR, dataset_cache: str | None = None):
    """Evaluate the FP model into ``out_dir/fp/``; returns its answer log-probs (the KL reference
    of every quantized run; None without the demo task). Used by the sweep flow."""
    from vlmq.lmms.loaders import load

    specs, rows, task_manager = _setup(params, dataset_cache)
    loaded = load(params.model.path, loader="fp", dtype=params.model.dtype, device=params.model.device)
    _, logprobs = _evaluate_loaded("fp", loaded, specs, params, task_manager, rows, None, Path(out_dir),
                                   get_logger("evaluate"))
    return logprobs


def evaluate(params_path: str | Path | None = None, out_dir: str | Path = OUT_DIR,
             runs: tuple[str, ...] = ("fp", "quant"), state_dir: str | Path = STATE,
             dataset_cache: str | None = None) -> dict:
    """Evaluate ``runs`` (``fp`` and/or ``quant``: the finished quantize run in ``state_dir``).
    Returns ``{run: result}``."""
    from vlmq.lmms.loaders import load

    params = load_params(params_path)
    cfg = params.eval
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    log = get_logger("evaluate")
    unknown = set(runs) - {"fp", "quant"}
    if unknown or not runs:
        raise ValueError(f"runs must be 'fp' and/or 'quant', got {list(runs)}")
    model_path(params)  # inputs are checked (model, tasks, their data, the quantize state) before the stage starts
    plan = []
    if "fp" in runs:
        plan.append(("fp", {"loader": "fp"}))
    if "quant" in runs:
        plan.append((quant_run(params, state_dir), {"loader": "fake_quant", "quant_state": str(state_dir)}))
    specs, rows, task_manager = _setup(params, dataset_cache)
    with stage_timer(log, "evaluate") as info:
        info["read"] += [params.model.path] + ([cfg.demo_eval] if rows is not None else [])
        fp_logprobs = None
        if "fp" not in runs and rows is not None:  # KL needs the FP distributions
            fp_logprobs = fp_answer_logprobs(params, rows)
        results = {}
        for run, how in plan:
            loaded = load(params.model.path, dtype=params.model.dtype, device=params.model.device, **how)
            if how["loader"] == "fake_quant":
                info["read"].append(state_dir)
            results[run], lp = _evaluate_loaded(run, loaded, specs, params, task_manager, rows, fp_logprobs,
                                                out_dir, log)
            if run == "fp":
                fp_logprobs = lp
            del loaded
            info["wrote"].append(out_dir / run)
    return results


def main(argv: list[str] | None = None, runner=call):
    """The stage's command line; ``runner(name, fn, *args)`` runs the stage function (plain here,
    as a Prefect flow from ``python -m pipeline.run``)."""
    ap = stage_parser(__doc__)
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--state", default=str(STATE), help="state directory of the quantize run")
    ap.add_argument("--runs", default="fp,quant", help="comma-separated: fp, quant (default both)")
    a = ap.parse_args(argv)
    runs = tuple(r.strip() for r in a.runs.split(",") if r.strip())
    return runner("evaluate", evaluate, a.params, a.out, runs, a.state)


if __name__ == "__main__":
    run_cli(main)
