"""Stage ``prepare_calib``: calibration samples in the model's own chat format.

Reads a local Parquet file (or a ``datasets`` ``save_to_disk`` directory) with an image, an
instruction and an answer per row (``calib.*_column``), applies the model's processor and chat
template (system / image / instruction / answer segments, paper Eq. 9), samples
``calib.n_samples`` rows with ``calib.seed``, truncates to ``calib.max_length`` and drops samples
whose vision segment would be cut (paper Appendix E). A row with a corrupt image is reported and
skipped. Writes ``data/calib/calib.parquet`` (schema in the README, "Artifacts").
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from stages.common import call, get_logger, model_path, run_cli, stage_parser, stage_timer, write_json, write_parquet
from stages.params import CalibParams, load_params

OUT_DIR = Path("data/calib")


def load_processor(model_path: str | Path):
    """The model's processor, from local files only (see :func:`vlmq.models.load_processor`)."""
    from vlmq.models.processor import load_processor as _load

    return _load(model_path)


def read_source(cfg: CalibParams) -> pd.DataFrame:
    src = Path(cfg.source)
    if src.is_dir():
        from datasets import load_from_disk

        df = load_from_disk(str(src)).to_pandas()
    elif src.is_file():
        df = pd.read_parquet(src)
    else:
        raise FileNotFoundError(f"calib.source: {src} does not exist (a Parquet file or a datasets directory)")
    missing = [c for c in (cfg.image_column, cfg.prompt_column, cfg.answer_column) if c not in df.columns]
    if missing:
        raise ValueError(f"calib.source {src}: missing column(s) {missing}; has {list(df.columns)}")
    return df


def image_bytes(value) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def messages(prompt: str, answer: str, system_prompt: str | None) -> list[dict]:
    msgs = []
    if system_prompt is not None:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def encode_sample(processor, image, prompt: str, answer: str, cfg: CalibParams):
    """Processor output for one sample, or a reason string why it is dropped."""
    text = processor.apply_chat_template(messages(prompt, answer, cfg.system_prompt), tokenize=False)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    return text, enc


def prepare_calib(params_path: str | Path | None = None, out_dir: str | Path = OUT_DIR) -> dict:
    from PIL import Image

    from vlmq.models import token_labels

    params = load_params(params_path)
    cfg = params.calib
    log = get_logger("prepare_calib")
    with stage_timer(log, "prepare_calib") as info:
        df = read_source(cfg)
        processor = load_processor(model_path(params, processor=True))
        info["read"] += [cfg.source, params.model.path]
        order = list(range(len(df)))
        random.Random(cfg.seed).shuffle(order)
        rows, skipped = [], {"corrupt_image": 0, "vision_truncated": 0}
        bar = tqdm(total=cfg.n_samples, desc="prepare_calib samples", unit="sample")
        for idx in order:
            if len(rows) == cfg.n_samples:
                break
            bar.update(len(rows) - bar.n)
            r = df.iloc[idx]
            try:
                raw = image_bytes(r[cfg.image_column])
                image = Image.open(io.BytesIO(raw))
                image.load()
                image = image.convert("RGB")
            except Exception as err:  # corrupt or unreadable image: report and skip
                skipped["corrupt_image"] += 1
                log.warning("prepare_calib: row %d skipped: corrupt image (%s)", idx, err)
                continue
            text, enc = encode_sample(processor, image, str(r[cfg.prompt_column]), str(r[cfg.answer_column]), cfg)
            ids = enc["input_ids"][0]
            seg, mod = token_labels(ids[None], processor)
            seg, mod = seg[0], mod[0]
            n_tok = int(ids.shape[0])
            truncated = n_tok > cfg.max_length
            if truncated:
                if bool((mod[cfg.max_length:] == 1).any()):
                    skipped["vision_truncated"] += 1
                    log.warning("prepare_calib: row %d skipped: %d tokens > max_length %d would cut the "
                                "vision segment", idx, n_tok, cfg.max_length)
                    continue
                ids, seg, mod = ids[:cfg.max_length], seg[:cfg.max_length], mod[:cfg.max_length]
            rows.append({
                "sample_id": len(rows),
                "source_row": int(idx),
                "image": raw,
                "prompt": str(r[cfg.prompt_column]),
                "answer": str(r[cfg.answer_column]),
                "text": text,
                "input_ids": ids.tolist(),
                "segment": seg.tolist(),
                "modality": mod.tolist(),
                "n_tokens": int(ids.shape[0]),
                "n_vision": int((mod == 1).sum()),
                "truncated": truncated,
            })
        bar.update(len(rows) - bar.n)
        bar.close()
        if not rows:
            raise RuntimeError(f"prepare_calib: no usable calibration sample in {cfg.source} (skipped: {skipped})")
        if len(rows) < cfg.n_samples:
            log.warning("prepare_calib: only %d usable samples (asked for %d)", len(rows), cfg.n_samples)
        out = pd.DataFrame(rows)
        out_dir = Path(out_dir)
        write_parquet(out, out_dir / "calib.parquet")
        vis_frac = float(out["n_vision"].sum() / out["n_tokens"].sum())
        summary = {"n_samples": len(rows), "skipped": skipped, "tokens": int(out["n_tokens"].sum()),
                   "vision_token_fraction": vis_frac, "max_tokens": int(out["n_tokens"].max())}
        write_json(out_dir / "summary.json", summary)
        info["wrote"] += [out_dir / "calib.parquet", out_dir / "summary.json"]
        log.info("prepare_calib: %d samples, %d tokens (%.1f%% vision), skipped %s",
                 len(rows), summary["tokens"], 100 * vis_frac, skipped)
    return summary


def main(argv: list[str] | None = None, runner=call):
    """The stage's command line; ``runner(name, fn, *args)`` runs the stage function (plain here,
    as a Prefect flow from ``python -m pipeline.run``)."""
    ap = stage_parser(__doc__)
    ap.add_argument("--out", default=str(OUT_DIR))
    a = ap.parse_args(argv)
    return runner("prepare_calib", prepare_calib, a.params, a.out)


if __name__ == "__main__":
    run_cli(main)
