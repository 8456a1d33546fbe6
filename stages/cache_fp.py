"""Stage ``cache_fp``: full-precision inputs X of every decoder layer, on disk.

Runs the FP model over ``data/calib/calib.parquet`` in mini-batches of ``calib.batch_size`` and
writes, streaming layer by layer (only one layer's activations are in memory at a time):

* ``data/cache/context.safetensors`` — the static layer context of every batch (attention mask,
  rotary cos/sin, position ids, token mask, input ids; ``b{k}.<field>``) and the per-token labels
  (``b{k}.segment``, ``b{k}.modality``, ``b{k}.sample_id``);
* ``data/cache/layer_{l:03d}.safetensors`` — X of layer l, one tensor ``b{k}`` [B, T, D] per
  batch, in ``cache.dtype`` (memory-mapped on read); with ``cache.layers: first`` only layer 0,
  in ``model.dtype`` (the quantize loop rounds it to ``cache.dtype`` and carries the FP stream);
* ``data/cache/summary.json`` — sizes, token counts, dtype.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from stages.common import call, dir_size_mb, get_logger, model_path, run_cli, save_safetensors, stage_parser, stage_timer, write_json
from stages.params import Params, load_params

CALIB = Path("data/calib/calib.parquet")
OUT_DIR = Path("data/cache")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def batch_rows(df, batch_size: int):
    for a in range(0, len(df), batch_size):
        yield df.iloc[a:a + batch_size]


def encode_batch(processor, rows):
    """Processor batch for calibration rows, checked against the stored token ids."""
    from PIL import Image

    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in rows["image"]]
    enc = processor(text=list(rows["text"]), images=images, return_tensors="pt", padding=True)
    n = [int(x) for x in rows["n_tokens"]]
    T = max(n)
    enc["input_ids"] = enc["input_ids"][:, :T]
    enc["attention_mask"] = enc["attention_mask"][:, :T].clone()
    for i, (ids, k) in enumerate(zip(rows["input_ids"], n)):
        if enc["input_ids"][i, :k].tolist() != list(ids):
            raise ValueError(f"{CALIB}: sample {rows['sample_id'].iloc[i]}: processor output differs from the "
                             "stored input_ids (processor changed since prepare_calib?)")
        enc["attention_mask"][i, k:] = 0
    return enc


def load_context(cache_dir: str | Path = OUT_DIR):
    """Per batch: (LayerInputs without hidden states, labels dict). Names the file if missing."""
    from safetensors.torch import load_file

    from vlmq.models import LayerInputs

    path = Path(cache_dir) / "context.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"FP cache: {path} is missing (run the cache_fp stage)")
    flat = load_file(str(path))
    n_batches = 1 + max(int(k.split(".", 1)[0][1:]) for k in flat)
    out = []
    for b in range(n_batches):
        pre = f"b{b:04d}."
        part = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
        labels = {k: part.pop(k) for k in ("segment", "modality", "sample_id")}
        part["hidden_states"] = torch.empty(0)
        out.append((LayerInputs.from_state_dict(part), labels))
    return out


def load_layer(cache_dir: str | Path, layer: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """X of ``layer`` per batch (memory-mapped safetensors), optionally cast to ``dtype``."""
    from safetensors import safe_open

    path = Path(cache_dir) / f"layer_{layer:03d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"FP cache: layer {layer}: {path} is missing (run the cache_fp stage)")
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        return [f.get_tensor(k) if dtype is None else f.get_tensor(k).to(dtype) for k in keys]


def cache_fp(params_path: str | Path | None = None, calib_path: str | Path = CALIB,
             out_dir: str | Path = OUT_DIR) -> dict:
    import pandas as pd
    from tqdm import tqdm

    from vlmq.models import load_model

    params: Params = load_params(params_path)
    log = get_logger("cache_fp")
    out_dir = Path(out_dir)
    path = model_path(params)  # before any other work: a bad model.path is the likelier mistake
    with stage_timer(log, "cache_fp") as info:
        if not Path(calib_path).is_file():
            raise FileNotFoundError(f"cache_fp: {calib_path} is missing (run the prepare_calib stage)")
        df = pd.read_parquet(calib_path)
        model, processor, adapter = load_model(path, dtype=DTYPES[params.model.dtype])
        model.eval()
        info["read"] += [calib_path, params.model.path]
        device = torch.device(params.model.device)
        context, x = {}, []
        with torch.no_grad():
            for b, rows in enumerate(batch_rows(df, params.calib.batch_size)):
                li = adapter.prepare_inputs(model, encode_batch(processor, rows))
                for k, v in li.state_dict().items():
                    if k != "hidden_states":
                        context[f"b{b:04d}.{k}"] = v
                T = li.seq_len
                pad = lambda seq: torch.tensor([list(s) + [-1] * (T - len(s)) for s in seq], dtype=torch.int8)
                context[f"b{b:04d}.segment"] = pad(rows["segment"])
                context[f"b{b:04d}.modality"] = pad(rows["modality"])
                context[f"b{b:04d}.sample_id"] = torch.tensor(rows["sample_id"].tolist(), dtype=torch.int64)
                x.append(li.hidden_states)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors(context, out_dir / "context.safetensors", metadata={"format": "vlmq.cache.context.v1"})
        ctx = load_context(out_dir)
        layers = adapter.decoder_layers(model)
        first_only = params.cache.layers == "first"
        # `first`: layer 0 in the model's dtype, the quantize loop rounds and propagates it itself
        dtype = params.model.dtype if first_only else params.cache.dtype
        for li_idx in tqdm(range(len(layers)), desc="cache_fp layers", unit="layer"):
            save_safetensors({f"b{b:04d}": t.to(DTYPES[dtype]) for b, t in enumerate(x)},
                             out_dir / f"layer_{li_idx:03d}.safetensors",
                             metadata={"format": "vlmq.cache.layer.v1", "layer": str(li_idx), "dtype": dtype})
            if li_idx + 1 == len(layers) or first_only:
                break
            layer = layers[li_idx].to(device)
            with torch.no_grad():
                x = [adapter.run_layer(layer, xb.to(device), c.to(device)).cpu() for xb, (c, _) in zip(x, ctx)]
            layers[li_idx].to("cpu")
        summary = {
            "n_layers": len(layers),
            "layers": params.cache.layers,
            "stored_layers": [0] if first_only else list(range(len(layers))),
            "n_batches": len(ctx),
            "n_samples": int(len(df)),
            "n_tokens": int(sum(int(c.token_mask.sum()) for c, _ in ctx)),
            "hidden_size": int(x[0].shape[-1]),
            "dtype": params.cache.dtype,
            "size_mb": round(dir_size_mb(out_dir), 3),
        }
        write_json(out_dir / "summary.json", summary)
        info["wrote"].append(f"{out_dir}/ ({summary['size_mb']:.1f} MiB, {summary['n_layers']} layers)")
    return summary


def main(argv: list[str] | None = None, runner=call):
    """The stage's command line; ``runner(name, fn, *args)`` runs the stage function (plain here,
    as a Prefect flow from ``python -m pipeline.run``)."""
    ap = stage_parser(__doc__)
    a = ap.parse_args(argv)
    return runner("cache_fp", cache_fp, a.params)


if __name__ == "__main__":
    run_cli(main)
