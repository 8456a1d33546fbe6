"""Inspect artifacts from the command line.

    python -m stages.inspect importance --layer 3          # g by segment / modality / module
    python -m stages.inspect importance                    # every layer, vision vs text
    python -m stages.inspect importance --dir data/sweep/vlmq-w3g128/importance

The same in pandas::

    df = pd.read_parquet("data/importance/layer_003.parquet")
    df.groupby(["module", "segment"], observed=True)["g"].describe()
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def importance_stats(directory: Path, layer: int | None) -> str:
    files = sorted(directory.glob("layer_*.parquet")) if layer is None else [directory / f"layer_{layer:03d}.parquet"]
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise SystemExit(f"inspect: no importance file {missing[0] if missing else directory / 'layer_*.parquet'}")
    out = []
    pd.set_option("display.width", 140)
    for f in files:
        df = pd.read_parquet(f)
        out.append(f"== {f} ({len(df)} rows, rule: {', '.join(sorted(df['rule'].astype(str).unique()))})")
        if layer is not None:
            seg = df.groupby(["module", "segment"], observed=True)["g"].agg(["count", "mean", "median", "std", "max"])
            out.append("g by module and segment:\n" + seg.to_string(float_format=lambda x: f"{x:.4g}"))
            err = df.groupby("segment", observed=True)["err_norm"].mean()
            out.append("mean |dz| by segment:\n" + err.to_string(float_format=lambda x: f"{x:.4g}"))
        mod = df.groupby("modality", observed=True)["g"].mean()
        ratio = mod.get("vision", float("nan")) / mod.get("text", float("nan"))
        out.append("mean g by modality: " + ", ".join(f"{k} {v:.4g}" for k, v in mod.items())
                   + f"  (vision/text {ratio:.3g})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Inspect pipeline artifacts")
    sub = ap.add_subparsers(dest="what", required=True)
    imp = sub.add_parser("importance", help="token importance statistics per segment/modality")
    imp.add_argument("--layer", type=int, default=None)
    imp.add_argument("--dir", type=Path, default=Path("data/importance"))
    a = ap.parse_args(argv)
    print(importance_stats(a.dir, a.layer))


if __name__ == "__main__":
    main()
