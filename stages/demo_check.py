"""Acceptance check of the demo model: FP accuracy per skill, RTN sensitivity, NLL/KL, vision share.

    python -m stages.demo_check [--limit N]

Greedy exact match on the held-out ``eval`` split for the FP model and for RTN fake quantization
(group 128, asymmetric) of every language-backbone decoder linear at W4/W3/W2; teacher-forced
answer-token NLL and KL(FP || quantized) with standard errors of the paired per-question
differences; the vision-token share of the calibration samples. Prints a table and writes
``<demo.out_dir>/check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from stages.params import load_params
from vlmq.demo import evaluate as ev
from vlmq.demo.data import read_rows
from vlmq.demo.model import decoder_linears
from vlmq.demo.tokenizer import user_prompt


def vision_fractions(processor, rows: list[dict]) -> list[float]:
    out = []
    for r in rows:
        text = processor.apply_chat_template(user_prompt(r["question"]), add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text + r["answer"] + "<|im_end|>"], images=[ev._image(r["image"])],
                        return_tensors="pt")["input_ids"][0]
        out.append(float((ids == processor.image_token_id).float().mean()))
    return out


def weight_stats(model) -> dict[str, float]:
    """Outlier statistics of the decoder linears (max |w| / std and excess-free kurtosis, worst layer)."""
    ratio, kurt = 0.0, 0.0
    for w in (lin.weight.detach().flatten() for lin in decoder_linears(model).values()):
        z = (w - w.mean()) / w.std()
        ratio = max(ratio, float(w.abs().max() / w.std()))
        kurt = max(kurt, float((z ** 4).mean()))
    return {"max_abs_over_std": round(ratio, 2), "kurtosis": round(kurt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N eval rows")
    ap.add_argument("--bits", default="4,3,2")
    args = ap.parse_args()
    p = load_params().demo
    torch.set_num_threads(p.train.threads)
    out_dir = Path(p.out_dir)
    model, processor = ev.load_demo_model(str(out_dir / "model"))
    rows = read_rows(out_dir / "eval.parquet")
    if args.limit:
        rows = rows[: args.limit]
    t0 = time.time()
    fp = ev.evaluate(model, processor, rows)
    results = {"fp": fp}
    for bits in [int(b) for b in args.bits.split(",")]:
        results[f"w{bits}"] = ev.evaluate(ev.apply_rtn(model, bits, 128), processor, rows, ref_lp=fp["logprobs"])
    fr = vision_fractions(processor, read_rows(out_dir / "calib.parquet"))
    skills = [k for k in fp["accuracy"] if k != "overall"] + ["overall"]
    report: dict = {"n_eval": len(rows), "seconds": round(time.time() - t0, 1),
                    "vision_fraction_calib": {"mean": statistics.mean(fr), "median": statistics.median(fr),
                                              "min": min(fr)},
                    "weights": weight_stats(model), "models": {}}
    print(f"{'model':6} " + " ".join(f"{s:>9}" for s in skills) + f" {'NLL':>8} {'KL':>8} {'KL SE':>7}")
    prev = None
    for name, r in results.items():
        acc = {s: r["accuracy"][s]["acc"] for s in skills}
        entry = {"accuracy": acc, "teacher_forced_exact": ev.mean(r["tf_correct"]), "nll": ev.mean(r["nll"]),
                 "nll_se_vs_fp": ev.paired_se(fp["nll"], r["nll"])}
        if r["kl"] is not None:
            entry["kl"] = ev.mean(r["kl"])
            entry["kl_se"] = ev.paired_se([0.0] * len(r["kl"]), r["kl"])
            entry["acc_drop_points"] = 100 * (acc["overall"] - fp["accuracy"]["overall"]["acc"])
            if prev is not None:
                entry["kl_step_vs_prev"] = entry["kl"] - ev.mean(results[prev]["kl"])
                entry["kl_step_se"] = ev.paired_se(results[prev]["kl"], r["kl"])
            prev = name
        report["models"][name] = entry
        kl = f"{entry.get('kl', 0.0):8.4f} {entry.get('kl_se', 0.0):7.4f}"
        print(f"{name:6} " + " ".join(f"{100 * acc[s]:9.1f}" for s in skills) + f" {entry['nll']:8.4f} {kl}"
              f"  (teacher-forced exact {100 * entry['teacher_forced_exact']:.1f})")
    for name, e in report["models"].items():
        if "kl_step_vs_prev" in e:
            print(f"KL step to {name}: {e['kl_step_vs_prev']:.4f} +- {e['kl_step_se']:.4f} "
                  f"({e['kl_step_vs_prev'] / max(e['kl_step_se'], 1e-12):.1f} SE)")
    vf = report["vision_fraction_calib"]
    print(f"vision-token share of calib samples: mean {vf['mean']:.3f} median {vf['median']:.3f} min {vf['min']:.3f}")
    print(f"decoder weights: {report['weights']}; eval took {report['seconds']} s")
    path = out_dir / "check.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
