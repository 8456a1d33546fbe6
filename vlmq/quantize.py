"""One decoder layer of the quantization loop (VLMQ paper, Algorithm 1), pure torch.

Two activation streams walk the layers: X (full precision: every earlier layer FP) and X̂ (every
earlier layer quantized). For one layer:

1. importance (VLMQ only): one forward of the attention block on X and on X̂ and one backward of
   L_block = ||Attn(X) − Attn(X̂)||² give g per token for each of q/k/v/o
   (:func:`vlmq.importance.gradient_importance`), or g from another source (constant, random
   low-importance vision tokens, a file of an earlier run);
2. solve, sub-block by sub-block in forward order ([q, k, v] → [o] → [gate, up] → [down], so each
   linear sees X̂ inputs produced by the already-quantized linears before it): streaming
   statistics over the calibration batches (H̃ with the projection's own G for the enhanced
   attention projections, plain H for the MLP), then :func:`vlmq.solver.solve`;
3. the caller propagates X̂ through the quantized layer and X through the FP layer.

Stages do the I/O (cache, Parquet, safetensors, resume); this module holds no file logic.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vlmq.hessian import HessianAccumulator
from vlmq.importance import PROJECTIONS, gradient_importance, random_low_importance
from vlmq.solver import QuantResult, solve

log = logging.getLogger(__name__)

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
METHODS = ("rtn", "gptq", "gptaq", "vlmq")
IMPORTANCE_SOURCES = ("gradient", "constant", "random", "file")
VISION = 1  # modality code of vision tokens (vlmq.models.labels.MODALITY_NAMES = ("text", "vision"))


@dataclass(frozen=True)
class LayerQuantConfig:
    """How to quantize one decoder layer (built from params.yaml by the quantize stage)."""

    method: str = "vlmq"
    bits: int = 3
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    precursor: str = "gptaq"
    importance: str = "gradient"
    norm: str = "l1"
    enhance: tuple[str, ...] = PROJECTIONS
    li_ratio: float = 0.5
    down_weight: float = 0.1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {METHODS}")
        if self.precursor not in ("gptq", "gptaq"):
            raise ValueError(f"precursor={self.precursor!r} must be 'gptq' or 'gptaq'")
        if self.importance not in IMPORTANCE_SOURCES:
            raise ValueError(f"importance={self.importance!r} must be one of {IMPORTANCE_SOURCES}")
        bad = set(self.enhance) - set(PROJECTIONS)
        if bad:
            raise ValueError(f"enhance={list(self.enhance)!r}: unknown projections {sorted(bad)}; allowed {PROJECTIONS}")

    @property
    def solver_method(self) -> str:
        """The solver's method for this config: rtn, gptq or gptaq (VLMQ runs on its precursor)."""
        return self.precursor if self.method == "vlmq" else self.method


@dataclass
class CalibBatch:
    """One calibration mini-batch at the input of the current layer.

    ``inputs`` holds the static layer context (mask, rotary embeddings, token_mask, …);
    ``x_fp`` / ``x_hat`` [B, T, D] the two streams; ``modality`` [B, T] (0 text, 1 vision)."""

    inputs: object  # vlmq.models.LayerInputs
    x_fp: torch.Tensor
    x_hat: torch.Tensor
    modality: torch.Tensor


@dataclass
class LayerOutcome:
    results: dict[str, QuantResult]
    g: dict[str, list[torch.Tensor]] = field(default_factory=dict)          # short name -> per batch [B, T]
    err_norm: dict[str, list[torch.Tensor]] = field(default_factory=dict)   # short name -> per batch [B, T]
    block_loss: list[float] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)


def _capture_inputs(modules: dict[str, nn.Module]):
    store: dict[str, torch.Tensor] = {}

    def make(name):
        def pre_hook(_m, args):
            store[name] = args[0].detach()
        return pre_hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    return store, handles


def layer_importance(adapter, layer: nn.Module, batches: list[CalibBatch], cfg: LayerQuantConfig, *,
                     generator: torch.Generator | None = None,
                     file_g: dict[str, list[torch.Tensor]] | None = None) -> LayerOutcome:
    """Step 1 of Algorithm 1: importance g per token for each attention projection."""
    linears = adapter.linears(layer)
    mods = {name.rsplit(".", 1)[1]: linears[name] for name in ATTN}
    out = LayerOutcome(results={}, g={n: [] for n in PROJECTIONS}, err_norm={n: [] for n in PROJECTIONS})
    for bi, b in enumerate(batches):
        mask = b.inputs.token_mask
        if cfg.importance == "gradient":
            res = gradient_importance(lambda h, b=b: adapter.attention_block(layer, h, b.inputs), mods,
                                      b.x_fp, b.x_hat, token_mask=mask, norm=cfg.norm,
                                      fallback=(cfg.bits, cfg.group_size, cfg.sym))
            g, err, loss, rule = res.g, res.err_norm, res.loss, res.rule
        else:
            if cfg.importance == "constant":
                base = torch.ones(mask.shape)
            elif cfg.importance == "random":
                if generator is None:
                    raise ValueError("importance='random' needs a seeded generator")
                base = random_low_importance(b.modality == VISION, cfg.li_ratio, cfg.down_weight, generator)
            else:  # file
                if file_g is None:
                    raise ValueError("importance='file' needs the g of an earlier run")
                base = None
            g = {n: (file_g[n][bi] if base is None else base) * mask.float() for n in PROJECTIONS}
            err = {n: torch.zeros(mask.shape) for n in PROJECTIONS}
            loss, rule = float("nan"), cfg.importance
        for n in PROJECTIONS:
            out.g[n].append(g[n].detach().float().cpu())
            out.err_norm[n].append(err[n].detach().float().cpu())
        out.block_loss.append(loss)
        out.rules.append(rule)
    return out


@torch.no_grad()
def quantize_layer(adapter, layer: nn.Module, batches: list[CalibBatch], cfg: LayerQuantConfig, *,
                   name: str = "layer", generator: torch.Generator | None = None,
                   file_g: dict[str, list[torch.Tensor]] | None = None,
                   on_step: Callable[[str], None] | None = None) -> LayerOutcome:
    """Quantize ``layer`` in place (its linears get the dequantized weights) and return the solver
    results and the importance factors. ``batches`` are not modified; propagate afterwards with
    ``adapter.run_layer``."""
    step = on_step or (lambda msg: None)
    linears = adapter.linears(layer)
    if cfg.method == "vlmq":
        with torch.enable_grad():
            outcome = layer_importance(adapter, layer, batches, cfg, generator=generator, file_g=file_g)
        step(f"{name}: importance ({cfg.importance}, rule {sorted(set(outcome.rules))})")
    else:
        outcome = LayerOutcome(results={})
    solver_method = cfg.solver_method
    kw = dict(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, act_order=cfg.act_order,
              damp=cfg.damp, method=solver_method, block_size=cfg.block_size)
    if solver_method == "rtn":
        for lname, lin in linears.items():
            res = solve(lin.weight.data, None, name=f"{name}.{lname}", **kw)
            adapter.set_weight(layer, lname, res.dequant)
            outcome.results[lname] = res
        step(f"{name}: rtn")
        return outcome

    fp_layer = copy.deepcopy(layer)  # the FP stream's inputs of every linear come from the FP layer
    fp_linears = adapter.linears(fp_layer)
    for subset in SUBSETS:
        accs = {ln: HessianAccumulator(linears[ln].in_features, residual=(solver_method == "gptaq"),
                                       name=f"{name}.{ln}", device=linears[ln].weight.device)
                for ln in subset}
        for bi, b in enumerate(batches):
            mask = b.inputs.token_mask.to(b.x_hat.device)
            x_in, h1 = _capture_inputs({ln: fp_linears[ln] for ln in subset})
            xh_in, h2 = _capture_inputs({ln: linears[ln] for ln in subset})
            try:
                if solver_method == "gptaq":
                    adapter.run_layer(fp_layer, b.x_fp, b.inputs)
                adapter.run_layer(layer, b.x_hat, b.inputs)
            finally:
                for h in h1 + h2:
                    h.remove()
            for ln in subset:
                short = ln.rsplit(".", 1)[1]
                g = None
                if cfg.method == "vlmq" and short in cfg.enhance:
                    g = outcome.g[short][bi].to(mask.device)[mask]
                x = x_in[ln][mask] if solver_method == "gptaq" else None
                accs[ln].add(xh_in[ln][mask], x, g)
        for ln in subset:
            res = solve(linears[ln].weight.data, accs[ln].finalize(), name=f"{name}.{ln}", **kw)
            adapter.set_weight(layer, ln, res.dequant)
            outcome.results[ln] = res
        step(f"{name}: solved {', '.join(s.rsplit('.', 1)[1] for s in subset)} ({solver_method})")
    del fp_layer
    return outcome
