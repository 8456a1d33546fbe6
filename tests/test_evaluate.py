"""stages.evaluate on the tiny model: lmms-eval (model type ``vlmq``, task ``vlmq_demo``) agrees
with an independent exact-match count, runs offline, and writes the documented artifacts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

os.environ["VLMQ_NO_PREFECT"] = "1"

MAX_NEW = 4


def _rtn_state(model_dir: Path, state: Path, run: str) -> None:
    """A finished quantize state (2-bit RTN solved weights + summary) without running quantize."""
    from safetensors.torch import save_file

    from vlmq.models import load_model
    from vlmq.quant import rtn

    model, _, adapter = load_model(model_dir)
    for l, layer in enumerate(adapter.decoder_layers(model)):
        t = {}
        for n in adapter.linear_names:
            q, s, z, g = rtn(adapter.get_linear(layer, n).weight, 2, 64)
            t.update({f"{n}.int_weight": q, f"{n}.scales": s, f"{n}.zeros": z, f"{n}.g_idx": g})
        (state / f"layer_{l:03d}").mkdir(parents=True)
        save_file(t, str(state / f"layer_{l:03d}" / "solved.safetensors"))
    (state / "summary.json").write_text(json.dumps({"run": run}))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open an internet connection fails the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access during evaluation: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def ascii_model(src: Path, dst: Path) -> Path:
    """A copy of the random tiny model whose lm_head can only prefer printable-ASCII tokens (the
    other rows zeroed): its greedy answers are clean text, so exact match is well defined."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vlmq.models.processor import load_processor

    shutil.copytree(src, dst)
    tok = load_processor(str(dst)).tokenizer
    special = set(tok.all_special_ids)
    keep = torch.tensor([(i not in special) and bool(s.strip()) and s.isascii() and s.isprintable()
                         for i, s in ((i, tok.decode([i])) for i in range(len(tok)))])
    tensors = load_file(str(dst / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("lm_head.weight"))
    W = tensors[key].clone()
    W[: len(keep)][~keep] = 0.0
    W[len(keep):] = 0.0
    W[: len(keep)][keep] *= 4.0
    tensors[key] = W
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_evaluate_matches_independent_exact_match(tmp_path, tiny_vlm, no_network):
    from stages.evaluate import PER_QUESTION_COLUMNS, evaluate
    from vlmq.demo.data import read_rows
    from vlmq.demo.evaluate import load_demo_model, greedy_answers, normalize

    model_dir = ascii_model(tiny_vlm["model"], tmp_path / "model")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert os.environ.get(var) == "1"

    # Independent greedy generation (vlmq.demo.evaluate, one question at a time). The eval split
    # is rewritten so that every other clean prediction becomes its question's reference answer: the
    # exact-match accuracy is then known in advance and not trivially 0 for a random model.
    rows = read_rows(tiny_vlm["eval"])
    model, processor = load_demo_model(str(model_dir))
    torch.manual_seed(0)
    preds = greedy_answers(model, processor, rows, batch_size=1, max_new_tokens=MAX_NEW)
    # (only clean predictions: a random model's byte-level BPE can emit partial UTF-8 / control
    # bytes whose decoding differs between decode paths)
    clean = [p.strip() != "" and p.isascii() and p.isprintable() for p in preds]
    clean_idx = [i for i, c in enumerate(clean) if c]
    made = set(clean_idx[::2]) if len(clean_idx) >= 4 else set(clean_idx)  # keep some negatives when possible
    answers = [preds[i] if i in made else r["answer"] for i, r in enumerate(rows)]
    print(f"{len(rows)} rows, {len(clean_idx)} clean predictions, {len(made)} made correct")
    table = pq.read_table(tiny_vlm["eval"])
    table = table.set_column(table.schema.get_field_index("answer"), "answer", pa.array(answers, pa.string()))
    eval_file = tmp_path / "eval.parquet"
    pq.write_table(table, eval_file)
    expected = [int(normalize(p) == normalize(a)) for p, a in zip(preds, answers)]
    assert sum(expected) >= 2

    state = tmp_path / "quantize"
    _rtn_state(model_dir, state, "rtn-w2g64")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir)},
        "eval": {"demo_eval": str(eval_file), "batch_size": 2, "max_new_tokens": MAX_NEW},
    }))
    out = tmp_path / "reports"
    results = evaluate(params, out_dir=out, state_dir=state, dataset_cache=str(tmp_path / "hf_datasets"))
    assert set(results) == {"fp", "rtn-w2g64"}

    # FP run: lmms-eval's generations are the independent ones, its accuracy the independent count
    fp = json.loads((out / "fp" / "result.json").read_text())
    assert fp["n"] == len(rows)
    assert fp["per_task"]["vlmq_demo"] == pytest.approx(sum(expected) / len(rows))
    assert fp["accuracy"] == pytest.approx(sum(expected) / len(rows))
    df = pd.read_parquet(out / "fp" / "per_question.parquet")
    assert list(df.columns) == PER_QUESTION_COLUMNS
    assert df["question_id"].tolist() == [r["image_id"] for r in rows]
    assert [p for p, c in zip(df["prediction"].tolist(), clean) if c] == [p for p, c in zip(preds, clean) if c]
    assert df["correct"].astype(int).tolist() == expected
    for skill in {r["skill"] for r in rows}:
        sel = [e for e, r in zip(expected, rows) if r["skill"] == skill]
        assert fp["per_skill"][skill] == pytest.approx(sum(sel) / len(sel))
    assert (df["kl_to_fp"] == 0).all() and fp["kl_to_fp"] == 0
    assert (df["answer_nll"] > 0).all() and fp["answer_nll"] == pytest.approx(df["answer_nll"].mean())

    # lmms-eval's own files, with the same generations as per_question.parquet
    lmms = json.loads((out / "fp" / "lmms_eval_results.json").read_text())
    assert lmms["results"]["vlmq_demo"]["exact_match,none"] == pytest.approx(fp["accuracy"])
    samples = [json.loads(l) for l in (out / "fp" / "samples_vlmq_demo.jsonl").read_text().splitlines()]
    own_count = sum(normalize(s["filtered_resps"][0]) == normalize(s["target"]) for s in samples)
    assert own_count == sum(expected)

    # quantized run: its own generations scored the same way, KL to FP > 0
    q = json.loads((out / "rtn-w2g64" / "result.json").read_text())
    dq = pd.read_parquet(out / "rtn-w2g64" / "per_question.parquet")
    assert q["model"]["loader"] == "fake_quant" and q["n"] == len(rows)
    own = [int(normalize(p) == normalize(a)) for p, a in zip(dq["prediction"], answers)]
    assert dq["correct"].astype(int).tolist() == own
    assert q["accuracy"] == pytest.approx(sum(own) / len(rows))
    assert (dq["kl_to_fp"] > 0).all() and q["kl_to_fp"] == pytest.approx(dq["kl_to_fp"].mean())
    assert not list(out.glob(".*"))  # no temporary leftovers

    # the sweep's entry point (one quantize run, FP reference recomputed) gives the same numbers
    from stages.evaluate import evaluate_run
    from stages.params import load_params

    r = evaluate_run(load_params(params), state_dir=state, out_dir=tmp_path / "sweep",
                     dataset_cache=str(tmp_path / "hf_datasets"))
    assert r["run"] == "rtn-w2g64" and (tmp_path / "sweep" / "rtn-w2g64" / "per_question.parquet").is_file()
    assert r["accuracy"] == q["accuracy"] and r["kl_to_fp"] == pytest.approx(q["kl_to_fp"], rel=1e-5)


def test_missing_quantize_state_is_reported(tmp_path, tiny_vlm):
    from stages.evaluate import evaluate

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"path": str(tiny_vlm["model"])},
                                      "eval": {"demo_eval": str(tiny_vlm["eval"])}}))
    with pytest.raises(FileNotFoundError, match="--runs fp"):
        evaluate(params, out_dir=tmp_path / "reports", state_dir=tmp_path / "nothing")


def test_eval_params():
    from stages.params import ParamsError, parse_params

    p = parse_params({})
    assert p.eval.task_list() == ["vlmq_demo"] and p.eval.batch_size == 1 and p.eval.limit is None
    p = parse_params({"eval": {"tasks": "paper", "scienceqa_robust_extraction": True}})
    tasks = p.eval.task_list()
    assert len(tasks) == 8 and "vlmq_scienceqa_img" in tasks and "scienceqa_img" not in tasks
    with pytest.raises(ParamsError, match="eval.batch_size"):
        parse_params({"eval": {"batch_size": 0}})
    with pytest.raises(ParamsError, match="eval.bogus"):
        parse_params({"eval": {"bogus": 1}})


def test_loglikelihood_matches_teacher_forced_answer_logprobs(tiny_vlm):
    """VLMQModel.loglikelihood of "answer<|im_end|>" == the sum of vlmq.demo.evaluate's
    teacher-forced answer-token log-probs (same prompt, independent code path)."""
    from lmms_eval.api.instance import Instance

    from vlmq.demo.data import load_split
    from vlmq.demo.evaluate import answer_logprobs
    from vlmq.lmms.models.vlmq import VLMQModel

    lm = VLMQModel(pretrained=str(tiny_vlm["model"]), batch_size=2)
    docs = load_split(tiny_vlm["eval"]).select(range(3))
    lm.task_dict = {"t": {"test": docs}}
    reqs = [Instance("loglikelihood", (d["question"], d["answer"] + "<|im_end|>", lambda doc: [doc["image"]], i, "t", "test"),
                     i, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    got = lm.loglikelihood(reqs)
    rows = [{"image": d["image"], "question": d["question"], "answer": d["answer"]} for d in docs]
    ref = answer_logprobs(lm.model, lm.processor, rows, batch_size=1)
    for (ll, greedy), (lp, t) in zip(got, ref):
        assert ll == pytest.approx(float(lp.gather(1, t[:, None]).sum()), abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == t).all())
