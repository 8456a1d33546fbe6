"""Stage: train the demo Qwen2-VL on the ``train`` split and save it with its processor.

    python -m stages.demo_model

Writes ``<demo.out_dir>/model/`` (safetensors weights, config, tokenizer, processor, chat
template, ``demo_train.json`` with the training record) so that the rest of the pipeline loads it
exactly like a downloaded Qwen2-VL checkpoint. Knobs: ``demo.model``, ``demo.train``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from stages.params import load_params
from vlmq.demo.data import CAPTION_INSTRUCTIONS, read_rows
from vlmq.demo.model import TrainConfig, build_config, set_determinism, train
from vlmq.demo.tokenizer import make_processor, train_tokenizer

CHAT_SCAFFOLD = ["user\n", "assistant\n", "system\nYou are a helpful assistant."]


def weights_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    from transformers import Qwen2VLForConditionalGeneration

    params = load_params().demo
    mp, tp = params.model, params.train
    out_dir = Path(params.out_dir)
    t0 = time.time()
    rows = read_rows(out_dir / "train.parquet")
    calib = read_rows(out_dir / "calib.parquet")[:tp.tokenizer_calib_rows]  # the committed model: the first 256
    texts = [t for r in rows for t in r["question"] + r["answer"]]
    texts += [r["question"] for r in calib] + [r["answer"] for r in calib] + list(CAPTION_INSTRUCTIONS) + CHAT_SCAFFOLD
    set_determinism(tp.seed, tp.threads)
    tokenizer = train_tokenizer(texts, mp.vocab_size)
    processor = make_processor(tokenizer, params.data.grid * params.data.cell)
    config = build_config(tokenizer, hidden_size=mp.hidden_size, intermediate_size=mp.intermediate_size,
                          num_layers=mp.num_layers, num_heads=mp.num_heads, mrope_section=mp.mrope_section,
                          vision_depth=mp.vision_depth, vision_embed_dim=mp.vision_embed_dim,
                          vision_heads=mp.vision_heads, rope_theta=mp.rope_theta)
    model = Qwen2VLForConditionalGeneration(config)
    # Hold out the last images (single questions) to monitor accuracy during training.
    holdout_rows = rows[len(rows) - tp.holdout:] if tp.holdout else []
    train_rows = rows[: len(rows) - tp.holdout]
    holdout = [{"image": r["image"], "question": q, "answer": a, "skill": s}
               for r in holdout_rows for q, a, s in zip(r["question"], r["answer"], r["skill"])]
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    cfg = TrainConfig(steps=tp.steps, batch_size=tp.batch_size, lr=tp.lr, warmup=tp.warmup,
                      min_lr_frac=tp.min_lr_frac, weight_decay=tp.weight_decay, max_turns=tp.max_turns,
                      aux_weight=tp.aux_weight, aux_layer=tp.aux_layer, qk_init_std=tp.qk_init_std,
                      grad_clip=tp.grad_clip, seed=tp.seed, log_every=tp.log_every,
                      curriculum_steps=tp.curriculum_steps, save_every=tp.save_every,
                      attn_weight=tp.attn_weight, attn_layer=tp.attn_layer,
                      vision_warmup_steps=tp.vision_warmup_steps, latent_weight=tp.latent_weight,
                      latent_start=tp.latent_start, count_target=tp.count_target,
                      value_weight=tp.value_weight, option_weight=tp.option_weight,
                      route_weight=tp.route_weight)

    def checkpoint(step: int) -> None:  # monitoring snapshot (not the deliverable)
        ckpt = out_dir / "model.ckpt"
        model.save_pretrained(ckpt)
        processor.save_pretrained(ckpt)
        (ckpt / "step.txt").write_text(f"{step}\n")

    record = train(model, processor, train_rows, cfg, params.data.grid, log=log, holdout=holdout or None,
                   checkpoint=checkpoint)

    final = out_dir / "model"
    tmp = out_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    record.update(params=params.model_dump(), log=log_lines, total_seconds=round(time.time() - t0, 1),
                  weights_sha256=weights_sha256(tmp))
    (tmp / "demo_train.json").write_text(json.dumps(record, indent=1) + "\n")
    old = out_dir / "model.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    print(json.dumps({"model": str(final), "weights_sha256": record["weights_sha256"],
                      "train_seconds": round(record["seconds"], 1), "total_seconds": record["total_seconds"]}))


if __name__ == "__main__":
    main()
