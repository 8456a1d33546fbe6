"""Stage ``quantize``: the per-layer loop of Algorithm 1 with resumable, inspectable artifacts.

For each decoder layer l, in order (two streams: X from the FP cache, X̂ propagated through the
already-quantized layers):

* ``data/importance/layer_{l:03d}.parquet`` — token importance g and output-error norm |Δz| per
  projection and token (VLMQ methods; schema in the README, "Artifacts");
* ``data/quantize/layer_{l:03d}/solved.safetensors`` — per linear ``<name>.int_weight``,
  ``.scales``, ``.zeros``, ``.g_idx`` (the solver's output; ``vlmq.quant.dequantize`` rebuilds the
  weight exactly), plus, for awq/mbq, the FP parameters the scale folding changed under their
  names in the layer (``input_layernorm.weight``, ``self_attn.v_proj.bias``, …);
* ``data/quantize/layer_{l:03d}/x_hat.safetensors`` — X̂ at the input of layer l+1 (kept for the
  latest finished layer only: enough to resume); with ``cache.layers: first`` also
  ``x_fp.safetensors``, the FP stream X at the input of layer l+1;
* ``data/quantize/layer_{l:03d}/done.json`` — written last: the layer is finished.

Killing the run and starting it again continues after the last finished layer and gives a result
bit-identical to an uninterrupted run (``data/quantize/fingerprint.json`` guards against resuming
with other params, model or calibration data). The vision tower, merger/projector, embeddings and
lm_head stay full precision.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages.cache_fp import DTYPES, load_context, load_layer
from stages.common import call, get_logger, model_path, peak_rss_mb, run_cli, save_safetensors, stage_parser, write_json, write_parquet
from stages.params import Params, load_params, run_name
from vlmq.state import STATE_DIR, apply_solved_layer, layer_dir, solved_file, solved_tensors

CACHE = Path("data/cache")
STATE = STATE_DIR
IMPORTANCE = Path("data/importance")
REPORTS = Path("reports/quantize")
SEGMENTS = ("system", "image", "instruction", "answer")
MODALITIES = ("text", "vision")


def layer_config(params: Params):
    from vlmq.quantize import LayerQuantConfig

    q, imp = params.quant, params.importance
    return LayerQuantConfig(method=q.method, bits=q.bits, group_size=q.group_size, sym=q.sym,
                            act_order=q.act_order, damp=q.damp, block_size=q.block_size,
                            precursor=q.precursor, importance=imp.source, norm=imp.norm,
                            enhance=tuple(imp.enhance), li_ratio=imp.li_ratio, down_weight=imp.down_weight,
                            granularity=imp.granularity, breakpoint=imp.breakpoint, pact_keep=imp.pact_keep,
                            pact_cutoff=imp.pact_cutoff, pact_coef=imp.pact_coef,
                            awq_grid=q.awq.grid, vlm_ptq_target=q.vlm_ptq.target,
                            vlm_ptq_vision_weight=q.vlm_ptq.vision_weight, vlm_ptq_grid=q.vlm_ptq.grid,
                            vlm_ptq_max_shrink=q.vlm_ptq.max_shrink, gptaq_alpha=q.gptaq.alpha,
                            gptaq_update=q.gptaq.update, first_layer=imp.first_layer,
                            importance_power=imp.power, importance_floor=imp.floor)


def importance_label(imp) -> str:
    """The importance source as reported: ``gradient`` plus a non-default granularity /
    breakpoint (``gradient:network``, ``gradient:o_proj_in``), else the source name."""
    from vlmq.importance import gradient_rule

    return gradient_rule(imp.source, imp.granularity, imp.breakpoint) if imp.source == "gradient" else imp.source


def code_hash() -> str:
    """sha256 over the math package and this stage: changed code never resumes stale state."""
    import vlmq

    h = hashlib.sha256()
    files = sorted(Path(vlmq.__file__).parent.rglob("*.py")) + [Path(__file__)]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(params: Params, cache_dir: Path) -> str:
    """What the state depends on: quant/importance/model params, the FP cache summary and the
    code; a resumed run with a different fingerprint starts over."""
    summary = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(cache_dir).glob("*") if f.is_file())
    blob = json.dumps({"quant": params.quant.model_dump(), "importance": params.importance.model_dump(),
                       "model": params.model.model_dump(), "calib": params.calib.model_dump(),
                       "seed": params.seed, "cache": summary, "code": code_hash()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def importance_frame(layer: int, outcome, ctx) -> "pd.DataFrame":
    import numpy as np
    import pandas as pd

    parts = []
    for name in outcome.g:
        for bi, (c, labels) in enumerate(ctx):
            mask = c.token_mask
            b_idx, t_idx = mask.nonzero(as_tuple=True)
            seg = labels["segment"][b_idx, t_idx].long().numpy()
            mod = labels["modality"][b_idx, t_idx].long().numpy()
            parts.append(pd.DataFrame({
                "layer": np.full(len(b_idx), layer, dtype=np.int16),
                "module": name,
                "sample_id": labels["sample_id"][b_idx].numpy(),
                "token_index": t_idx.numpy().astype(np.int32),
                "segment": pd.Categorical.from_codes(seg, SEGMENTS),
                "modality": pd.Categorical.from_codes(mod, MODALITIES),
                "g": outcome.g[name][bi][b_idx, t_idx].numpy().astype(np.float32),
                "err_norm": outcome.err_norm[name][bi][b_idx, t_idx].numpy().astype(np.float32),
                "rule": outcome.rules[bi],
            }))
    df = pd.concat(parts, ignore_index=True)
    df["module"] = df["module"].astype("category")
    return df


def read_file_importance(path: Path, layer: int, ctx) -> dict[str, list[torch.Tensor]]:
    """g of an earlier run (importance.source = file) laid out per batch [B, T]."""
    import pandas as pd

    f = path / f"layer_{layer:03d}.parquet"
    if not f.is_file():
        raise FileNotFoundError(f"importance.file: {f} is missing")
    df = pd.read_parquet(f, columns=["module", "sample_id", "token_index", "g"])
    out: dict[str, list[torch.Tensor]] = {}
    for name, part in df.groupby("module", observed=True):
        lookup = {(int(s), int(t)): float(g) for s, t, g in zip(part["sample_id"], part["token_index"], part["g"])}
        per_batch = []
        for c, labels in ctx:
            g = torch.zeros(c.token_mask.shape)
            for bi, sid in enumerate(labels["sample_id"].tolist()):
                for t in c.token_mask[bi].nonzero().squeeze(1).tolist():
                    if (sid, t) not in lookup:
                        raise ValueError(f"importance.file: {f} has no g for sample {sid} token {t} ({name})")
                    g[bi, t] = lookup[(sid, t)]
            per_batch.append(g)
        out[str(name)] = per_batch
    return out


@dataclass
class QuantizeRun:
    """The loop's state; the flow (pipeline/flows.py) calls :meth:`step` once per layer."""

    params: Params
    cache_dir: Path = CACHE
    state_dir: Path = STATE
    importance_dir: Path = IMPORTANCE
    report_dir: Path = REPORTS
    log: object = None
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        from vlmq.models import load_model

        self.log = self.log or get_logger("quantize")
        self.cfg = layer_config(self.params)
        self.dtype = DTYPES[self.params.model.dtype]
        self.device = torch.device(self.params.model.device)
        self.model, self.processor, self.adapter = load_model(model_path(self.params), dtype=self.dtype)
        self.model.eval().requires_grad_(False)
        self.layers = self.adapter.decoder_layers(self.model)
        self.ctx = load_context(self.cache_dir)
        fp = fingerprint(self.params, self.cache_dir)
        fp_file = self.state_dir / "fingerprint.json"
        if fp_file.is_file() and json.loads(fp_file.read_text()).get("fingerprint") != fp:
            self.log.info("quantize: params, model or cache changed since the saved state: starting over")
            shutil.rmtree(self.state_dir)
            shutil.rmtree(self.importance_dir, ignore_errors=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json(fp_file, {"fingerprint": fp})
        self.start = 0
        while (self.layer_dir(self.start) / "done.json").is_file() and self.start < len(self.layers):
            self.start += 1
        # cache.layers = first: the FP stream X of the current layer is carried here (model dtype,
        # as cache_fp propagates it); each layer's X is that stream rounded to cache.dtype, the
        # values cache.layers = all would have stored, so both give bit-identical results
        self.fp_stream = self.params.cache.layers == "first"
        self.store = DTYPES[self.params.cache.dtype]
        if self.start:
            self.log.info("quantize: resuming after %d finished layer(s)", self.start)
            for l in range(self.start):
                self.apply_solved(l)
            self.x_hat = self.load_stream(self.start - 1, "x_hat")
            self.x_fp = self.load_stream(self.start - 1, "x_fp") if self.fp_stream else None
        elif self.fp_stream:
            self.x_fp = load_layer(self.cache_dir, 0)
            self.x_hat = self.as_cached(self.x_fp)
        else:
            self.x_hat, self.x_fp = load_layer(self.cache_dir, 0, self.dtype), None

    def layer_dir(self, l: int) -> Path:
        return layer_dir(self.state_dir, l)

    def apply_solved(self, l: int) -> None:
        apply_solved_layer(self.adapter, self.layers[l], solved_file(self.state_dir, l))

    def as_cached(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The FP stream as ``cache.layers: all`` would hold it: rounded to ``cache.dtype``."""
        return [x.to(self.store).to(self.dtype) for x in xs]

    def load_stream(self, l: int, stream: str) -> list[torch.Tensor]:
        """X̂ (``x_hat``) or the FP stream (``x_fp``) at the input of layer l+1, saved to resume."""
        from safetensors.torch import load_file

        f = self.layer_dir(l) / f"{stream}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"quantize: resume state {f} is missing (delete {self.state_dir} to start over)")
        t = load_file(str(f))
        return [t[k] for k in sorted(t)]

    def todo(self) -> range:
        return range(self.start, len(self.layers))

    def step(self, l: int) -> dict:
        """Importance + solve of layer ``l``, then propagate X̂; writes the layer's artifacts."""
        return self.solve_step(l, self.importance_step(l))

    def importance_step(self, l: int) -> dict:
        """Step 1 of Algorithm 1 for layer ``l`` (token importance G; nothing for methods without
        it). Returns the work item :meth:`solve_step` continues from."""
        from vlmq.quantize import CalibBatch, NetworkTail, layer_importance

        t0 = time.perf_counter()
        layer = self.layers[l].to(self.device)
        x_fp_next = None
        if self.fp_stream:  # X of this layer as the cache would hold it, and the FP layer's output
            x_fp = self.as_cached(self.x_fp)
            with torch.no_grad():
                x_fp_next = [self.adapter.run_layer(layer, x.to(self.device), c.to(self.device)).cpu()
                             for x, (c, _) in zip(self.x_fp, self.ctx)]
        else:
            x_fp = load_layer(self.cache_dir, l, self.dtype)
        batches = [CalibBatch(inputs=c.to(self.device), x_fp=xf.to(self.device), x_hat=xh.to(self.device),
                              modality=lab["modality"].to(self.device), segment=lab["segment"].to(self.device))
                   for (c, lab), xf, xh in zip(self.ctx, x_fp, self.x_hat)]
        gen = torch.Generator().manual_seed(self.params.seed * 100_003 + l)
        outcome = None
        if self.cfg.uses_importance:
            network, moved = None, []
            if self.cfg.importance == "gradient" and self.cfg.granularity == "network":
                # L_Network: X̂ of this layer runs through the later (still FP) layers and the head
                moved = self.layers[l + 1:] + [self.adapter.final_norm(self.model), self.adapter.lm_head(self.model)]
                for m in moved:
                    m.to(self.device)
                network = NetworkTail(layers=self.layers[l + 1:], head=lambda h: self.adapter.logits(self.model, h))
            file_g = None
            if self.cfg.importance == "file":
                if not self.params.importance.file:
                    raise ValueError("importance.source is 'file' but importance.file is not set")
                file_g = read_file_importance(Path(self.params.importance.file), l, self.ctx)
            with torch.enable_grad():
                outcome = layer_importance(self.adapter, layer, batches, self.cfg, generator=gen, file_g=file_g,
                                           network=network)
            for m in moved:
                m.to("cpu")
            self.log.info("quantize: layers.%d: importance (%s, rule %s)", l, self.cfg.importance,
                          sorted(set(outcome.rules)))
        return {"layer": l, "batches": batches, "importance": outcome, "generator": gen, "t0": t0,
                "x_fp_next": x_fp_next}

    def solve_step(self, l: int, work: dict) -> dict:
        """Steps 2-3 for layer ``l``: solve every linear, propagate X̂, write the artifacts."""
        from vlmq.quantize import quantize_layer

        if work["layer"] != l:
            raise ValueError(f"solve_step({l}) got the importance of layer {work['layer']}")
        t0, batches, layer = work["t0"], work["batches"], self.layers[l]
        outcome = quantize_layer(self.adapter, layer, batches, self.cfg, name=f"layers.{l}",
                                 generator=work["generator"], importance=work["importance"],
                                 on_step=lambda m: self.log.info("quantize: %s", m))
        with torch.no_grad():
            x_next = [self.adapter.run_layer(layer, b.x_hat, b.inputs).cpu() for b in batches]
        self.layers[l].to("cpu")
        d = self.layer_dir(l)
        d.mkdir(parents=True, exist_ok=True)
        q = self.params.quant
        save_safetensors(solved_tensors(outcome.results, outcome.fp_params), solved_file(self.state_dir, l),
                         metadata={"bits": str(q.bits), "group_size": str(q.group_size), "sym": str(q.sym),
                                   "method": q.method, "layer": str(l)})
        if outcome.g:
            write_parquet(importance_frame(l, outcome, self.ctx), self.importance_dir / f"layer_{l:03d}.parquet")
        streams = {"x_hat": x_next} | ({"x_fp": work["x_fp_next"]} if self.fp_stream else {})
        for stream, xs in streams.items():
            save_safetensors({f"b{i:04d}": t for i, t in enumerate(xs)}, d / f"{stream}.safetensors")
        seconds = time.perf_counter() - t0
        record = {"layer": l, "seconds": seconds, "block_loss": outcome.block_loss, "rules": sorted(set(outcome.rules)),
                  "damp_used": {n: r.damp_used for n, r in outcome.results.items()}}
        if outcome.info:
            record["search"] = outcome.info  # awq/mbq: alpha per group; vlm_ptq: clipping ratios
        write_json(d / "done.json", record)
        for stream in streams:  # only the latest is needed to resume
            if l > 0 and (self.layer_dir(l - 1) / f"{stream}.safetensors").is_file():
                (self.layer_dir(l - 1) / f"{stream}.safetensors").unlink()
        self.x_hat = x_next
        if self.fp_stream:
            self.x_fp = work["x_fp_next"]
        self.log.info("quantize: layer %d/%d done in %.1f s (peak RSS %.0f MiB)", l + 1, len(self.layers),
                      seconds, peak_rss_mb())
        return record

    def finish(self, total_seconds: float) -> dict:
        per_layer = [json.loads((self.layer_dir(l) / "done.json").read_text()) for l in range(len(self.layers))]
        q = self.params.quant
        summary = {"method": q.method, "bits": q.bits, "group_size": q.group_size, "sym": q.sym,
                   "act_order": q.act_order,
                   "precursor": self.cfg.solver_method if self.cfg.solver_method in ("gptq", "gptaq") else None,
                   "gptaq": q.gptaq.model_dump() if self.cfg.solver_method == "gptaq" else None,
                   "importance": importance_label(self.params.importance) if self.cfg.uses_importance else None,
                   "quantize_seconds": sum(r["seconds"] for r in per_layer),
                   "wall_seconds_this_run": total_seconds, "peak_rss_mb": peak_rss_mb(),
                   "layers": per_layer}
        summary["run"] = run_name(self.params)
        write_json(self.state_dir / "summary.json", summary)
        files = sorted(f.name for f in self.importance_dir.glob("layer_*.parquet")) if self.cfg.uses_importance else []
        write_json(self.importance_dir / "summary.json",  # always there: the DVC out exists for every method
                   {"run": summary["run"], "method": q.method, "importance": summary["importance"], "files": files})
        write_json(self.report_dir / f"{summary['run']}.json", {k: v for k, v in summary.items() if k != "layers"})
        return summary


def quantize(params_path: str | Path | None = None, **dirs) -> dict:
    """Run the whole loop without Prefect (the flow in pipeline/flows.py does the same, one task
    per layer)."""
    params = load_params(params_path)
    t0 = time.perf_counter()
    run = QuantizeRun(params, **dirs)
    for l in run.todo():
        run.step(l)
    return run.finish(time.perf_counter() - t0)


def main(argv: list[str] | None = None, runner=call):
    """The stage's command line; ``runner(name, fn, *args)`` runs the stage function (plain here,
    as a Prefect flow from ``python -m pipeline.run``)."""
    ap = stage_parser(__doc__)
    a = ap.parse_args(argv)
    return runner("quantize", quantize, a.params)


if __name__ == "__main__":
    run_cli(main)
