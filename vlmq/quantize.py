"""One decoder layer of the quantization loop (VLMQ paper, Algorithm 1), pure torch.

Two activation streams walk the layers: X (full precision: every earlier layer FP) and X̂ (every
earlier layer quantized). For one layer:

1. importance (VLMQ only): one forward of the attention block on X and on X̂ and one backward of
   L_block = ||Attn(X) − Attn(X̂)||² give g per token for each of q/k/v/o
   (:func:`vlmq.importance.gradient_importance`; layer-wise / network-wise losses and the
   o_proj_in breakpoint of the paper's ablations on the same path), or g from another source
   (FastV / PACT attention scores, constant, random low-importance vision tokens, a file of an
   earlier run);
2. solve, sub-block by sub-block in forward order ([q, k, v] → [o] → [gate, up] → [down], so each
   linear sees X̂ inputs produced by the already-quantized linears before it): streaming
   statistics over the calibration batches (H̃ with the projection's own G for the enhanced
   attention projections, plain H for the MLP), then :func:`vlmq.solver.solve`;
3. the caller propagates X̂ through the quantized layer and X through the FP layer.

Every method runs this one loop as a small strategy (:mod:`vlmq.methods`): ``awq`` / ``mbq``
fold a per-channel scale search into the op before each sub-block and then round (RTN; MBQ's
modality sensitivities come from step 1's g); ``vlm_ptq`` / ``vlmq+vlm_ptq`` run step 2 on GPTAQ /
the precursor with VLM-PTQ's target and per-group clipping search weighted by the modality-aware
channel importance (:mod:`vlmq.vlm_ptq`, docs/vlm_ptq.md).

Stages do the I/O (cache, Parquet, safetensors, resume); this module holds no file logic.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vlmq.hessian import HessianAccumulator
from vlmq.importance import (ATTENTION_SOURCES, BREAKPOINTS, GRANULARITIES, PROJECTIONS, AttentionGeometry,
                             attention_importance, gradient_importance, random_low_importance, sft_targets)
from vlmq.methods import REGISTRY, get_method
from vlmq.methods.base import LayerJob
from vlmq.solver import QuantResult, solve

log = logging.getLogger(__name__)

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
IMPORTANCE_SOURCES = ("gradient", "constant", "random", "file") + ATTENTION_SOURCES
FIRST_LAYER_RULES = ("rtn_fallback", "uniform")
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
    granularity: str = "block"      # gradient: loss of Table 7 (layer | block | network)
    breakpoint: str = "attn_out"    # gradient, block: where L_block is measured (attn_out | o_proj_in)
    pact_keep: float = 0.55         # pact: fraction of vision tokens kept by the EUTI pruning
    pact_cutoff: float = 0.21       # pact: DBDPC cosine-distance cutoff
    pact_coef: float = 1.5          # pact: pruned tokens within coef * cutoff are retrieved
    awq_grid: int = 20              # awq / mbq: grid points of α in [0, 1]
    vlm_ptq_target: str = "corrected"   # vlm_ptq: corrected | uncorrected (ablation)
    vlm_ptq_vision_weight: float = 1.0  # vlm_ptq: β, weight of the vision mean in the channel importance
    vlm_ptq_grid: int = 20              # vlm_ptq: clipping ratios searched per group (1 = no search)
    vlm_ptq_max_shrink: float = 0.5     # vlm_ptq: smallest ratio = 1 − max_shrink
    gptaq_alpha: float = 0.25           # every GPTAQ solve: weight of the residual term (0 = GPTQ)
    gptaq_update: str = "reference"     # reference (GPTAQ's code) | exact (derived full shift)
    first_layer: str = "rtn_fallback"   # gradient, zero loss (layer 0): rtn_fallback | uniform (g = 1)
    importance_power: float = 1.0       # p: G^p enters H̃ (1 = the paper)
    importance_floor: float = 0.0       # β: g² ← (1 − β) g²/mean(g²) + β per projection and layer

    def __post_init__(self):
        if self.method not in REGISTRY:
            raise ValueError(f"method={self.method!r} must be one of {tuple(REGISTRY)}")
        if self.precursor not in ("gptq", "gptaq"):
            raise ValueError(f"precursor={self.precursor!r} must be 'gptq' or 'gptaq'")
        if self.importance not in IMPORTANCE_SOURCES:
            raise ValueError(f"importance={self.importance!r} must be one of {IMPORTANCE_SOURCES}")
        bad = set(self.enhance) - set(PROJECTIONS)
        if bad:
            raise ValueError(f"enhance={list(self.enhance)!r}: unknown projections {sorted(bad)}; allowed {PROJECTIONS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} must be one of {GRANULARITIES}")
        if self.breakpoint not in BREAKPOINTS:
            raise ValueError(f"breakpoint={self.breakpoint!r} must be one of {BREAKPOINTS}")
        if self.breakpoint != "attn_out" and self.granularity != "block":
            raise ValueError(f"breakpoint={self.breakpoint!r} applies to granularity 'block' only "
                             f"(granularity={self.granularity!r})")
        if not 0.0 < self.pact_keep <= 1.0:
            raise ValueError(f"pact_keep={self.pact_keep!r} must be in (0, 1]")
        if not 0.0 <= self.pact_cutoff <= 2.0:
            raise ValueError(f"pact_cutoff={self.pact_cutoff!r} must be a cosine distance in [0, 2]")
        if self.pact_coef < 0:
            raise ValueError(f"pact_coef={self.pact_coef!r} must be >= 0")
        from vlmq.vlm_ptq import TARGETS

        if isinstance(self.awq_grid, bool) or not isinstance(self.awq_grid, int) or self.awq_grid < 2:
            raise ValueError(f"awq_grid={self.awq_grid!r} must be an integer >= 2")
        if self.vlm_ptq_target not in TARGETS:
            raise ValueError(f"vlm_ptq_target={self.vlm_ptq_target!r} must be one of {TARGETS}")
        if not self.vlm_ptq_vision_weight >= 0:
            raise ValueError(f"vlm_ptq_vision_weight={self.vlm_ptq_vision_weight!r} must be >= 0")
        if isinstance(self.vlm_ptq_grid, bool) or not isinstance(self.vlm_ptq_grid, int) or self.vlm_ptq_grid < 1:
            raise ValueError(f"vlm_ptq_grid={self.vlm_ptq_grid!r} must be a positive integer")
        if not 0.0 <= self.vlm_ptq_max_shrink < 1.0:
            raise ValueError(f"vlm_ptq_max_shrink={self.vlm_ptq_max_shrink!r} must be in [0, 1)")
        if self.gptaq_update not in ("reference", "exact"):
            raise ValueError(f"gptaq_update={self.gptaq_update!r} must be 'reference' or 'exact'")
        if not self.gptaq_alpha >= 0:
            raise ValueError(f"gptaq_alpha={self.gptaq_alpha!r} must be >= 0")
        if self.first_layer not in FIRST_LAYER_RULES:
            raise ValueError(f"first_layer={self.first_layer!r} must be one of {FIRST_LAYER_RULES}")
        if not self.importance_power >= 0:
            raise ValueError(f"importance_power={self.importance_power!r} must be >= 0")
        if not 0.0 <= self.importance_floor <= 1.0:
            raise ValueError(f"importance_floor={self.importance_floor!r} must be in [0, 1]")

    @property
    def strategy(self):
        """The method's strategy object (:mod:`vlmq.methods`)."""
        return get_method(self.method)

    @property
    def solver_method(self) -> str:
        """The solver's method for this config: rtn, gptq or gptaq (VLMQ and VLMQ+VLM-PTQ run on
        their precursor, VLM-PTQ on GPTAQ, AWQ/MBQ on RTN after the scale fold)."""
        return self.strategy.solver(self)

    @property
    def uses_importance(self) -> bool:
        """Whether the method computes token importance g (VLMQ, MBQ's sensitivities, VLMQ+VLM-PTQ)."""
        return self.strategy.uses_importance


@dataclass
class CalibBatch:
    """One calibration mini-batch at the input of the current layer.

    ``inputs`` holds the static layer context (mask, rotary embeddings, token_mask, …);
    ``x_fp`` / ``x_hat`` [B, T, D] the two streams; ``modality`` [B, T] (0 text, 1 vision)."""

    inputs: object  # vlmq.models.LayerInputs
    x_fp: torch.Tensor
    x_hat: torch.Tensor
    modality: torch.Tensor
    segment: torch.Tensor | None = None  # [B, T] segment codes (granularity="network": answer targets)


@dataclass
class NetworkTail:
    """What follows a layer's attention block for ``granularity="network"``: the (FP) decoder
    layers after it and the output head ``head(h) -> logits`` (final norm + lm_head), on the
    device of the batches."""

    layers: list
    head: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerOutcome:
    results: dict[str, QuantResult]
    g: dict[str, list[torch.Tensor]] = field(default_factory=dict)          # short name -> per batch [B, T]
    err_norm: dict[str, list[torch.Tensor]] = field(default_factory=dict)   # short name -> per batch [B, T]
    block_loss: list[float] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    # FP parameters changed by AWQ/MBQ's scale folding (name in the layer -> tensor), saved with
    # the quantized state; ``info``: per-method search records (JSON-serialisable)
    fp_params: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    # wall seconds of the solve step: "statistics" (the sub-block forwards and the accumulation,
    # linear in the calibration tokens) and "solve" (the solver, independent of them)
    seconds: dict[str, float] = field(default_factory=lambda: {"statistics": 0.0, "solve": 0.0})


class _Captured(Exception):
    """Raised by :func:`linear_inputs`' hooks once every wanted linear has seen its input."""


def linear_inputs(adapter, layer: nn.Module, hidden: torch.Tensor, layer_inputs,
                  modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The inputs of ``modules`` (name -> a linear of ``layer``) in a forward of ``layer`` on
    ``hidden``. The forward stops once the last of them is reached: the rest of the layer is not
    computed (for [q, k, v] that is all of it but the norm; at 7B shapes the four sub-block passes
    cost less than one full forward instead of four)."""
    store: dict[str, torch.Tensor] = {}

    def make(name):
        def pre_hook(_m, args):
            store[name] = args[0].detach()
            if len(store) == len(modules):
                raise _Captured

        return pre_hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        adapter.run_layer(layer, hidden, layer_inputs)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(modules) - set(store))
    if missing:
        raise RuntimeError(f"the layer's forward never called {missing}")
    return store


def layer_importance(adapter, layer: nn.Module, batches: list[CalibBatch], cfg: LayerQuantConfig, *,
                     generator: torch.Generator | None = None,
                     file_g: dict[str, list[torch.Tensor]] | None = None,
                     network: NetworkTail | None = None) -> LayerOutcome:
    """Step 1 of Algorithm 1: importance g per token for each attention projection.

    ``cfg.importance``: gradient (Eq. 4-5; ``cfg.granularity`` / ``cfg.breakpoint`` choose the
    loss of paper Tables 7/8, ``network`` is required for granularity "network"), fastv / pact
    (attention scores, Table 6), constant, random (VLMQ-naive) or file (``file_g``)."""
    linears = adapter.linears(layer)
    mods = {name.rsplit(".", 1)[1]: linears[name] for name in ATTN}
    if cfg.importance == "gradient" and cfg.granularity == "network" and network is None:
        raise ValueError("granularity='network' needs the network tail (the layers after this one and the head)")
    out = LayerOutcome(results={}, g={n: [] for n in PROJECTIONS}, err_norm={n: [] for n in PROJECTIONS})
    for bi, b in enumerate(batches):
        mask = b.inputs.token_mask

        def block_fn(h, b=b):
            return adapter.attention_block(layer, h, b.inputs)

        if cfg.importance == "gradient":
            net_loss = None
            if cfg.granularity == "network":
                net_loss = _network_loss(adapter, layer, b, network)
            fallback = (cfg.bits, cfg.group_size, cfg.sym) if cfg.first_layer == "rtn_fallback" else None
            res = gradient_importance(block_fn, mods, b.x_fp, b.x_hat, token_mask=mask, norm=cfg.norm,
                                      fallback=fallback, granularity=cfg.granularity,
                                      breakpoint=cfg.breakpoint, network_loss=net_loss)
            g, err, loss, rule = res.g, res.err_norm, res.loss, res.rule
        elif cfg.importance in ATTENTION_SOURCES:
            res = attention_importance(block_fn, mods, b.x_fp, b.x_hat, style=cfg.importance,
                                       geometry=AttentionGeometry.of(layer.get_submodule("self_attn")),
                                       position_embeddings=b.inputs.position_embeddings,
                                       attention_mask=b.inputs.attention_mask, token_mask=mask,
                                       vision=(b.modality == VISION), pact_keep=cfg.pact_keep,
                                       pact_cutoff=cfg.pact_cutoff, pact_coef=cfg.pact_coef)
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


def _network_loss(adapter, layer: nn.Module, b: CalibBatch, network: NetworkTail) -> Callable[[torch.Tensor], torch.Tensor]:
    """L_Network for one batch: Attn(X̂) → this layer's MLP → the later (FP) layers → head, summed
    cross-entropy of the next-token predictions on the ground-truth answer tokens (SFT loss)."""
    if b.segment is None or b.inputs.input_ids is None:
        raise ValueError("granularity='network' needs input_ids and segment labels in every batch")
    pos, labels = sft_targets(b.inputs.input_ids, b.inputs.token_mask, b.segment.to(b.inputs.input_ids.device))

    def loss(h: torch.Tensor) -> torch.Tensor:
        if not pos.any():
            return h.new_zeros(())
        h = adapter.mlp_block(layer, h)
        for later in network.layers:
            h = adapter.run_layer(later, h, b.inputs)
        logits = network.head(h[pos.to(h.device)])
        return torch.nn.functional.cross_entropy(logits.float(), labels.to(h.device)[pos.to(h.device)], reduction="sum")

    return loss


@torch.no_grad()
def quantize_layer(adapter, layer: nn.Module, batches: list[CalibBatch], cfg: LayerQuantConfig, *,
                   name: str = "layer", generator: torch.Generator | None = None,
                   file_g: dict[str, list[torch.Tensor]] | None = None,
                   on_step: Callable[[str], None] | None = None,
                   network: NetworkTail | None = None,
                   importance: LayerOutcome | None = None) -> LayerOutcome:
    """Quantize ``layer`` in place (its linears get the dequantized weights) and return the solver
    results and the importance factors. ``batches`` are not modified; propagate afterwards with
    ``adapter.run_layer``. ``importance``: the result of :func:`layer_importance` for this layer
    and these batches when the caller ran step 1 itself (else it is computed here).

    The loop is the same for every method; ``cfg.strategy`` (:mod:`vlmq.methods`) fills in what
    differs: importance or not, the solver, the preparation of the layer, the token weights of
    H̃, extra statistics and solver options."""
    step = on_step or (lambda msg: None)
    method = cfg.strategy
    linears = adapter.linears(layer)
    if method.uses_importance and importance is not None:
        outcome = importance
    elif method.uses_importance:
        with torch.enable_grad():
            outcome = layer_importance(adapter, layer, batches, cfg, generator=generator, file_g=file_g,
                                       network=network)
        step(f"{name}: importance ({cfg.importance}, rule {sorted(set(outcome.rules))})")
    else:
        outcome = LayerOutcome(results={})
    job = LayerJob(adapter=adapter, layer=layer, batches=batches, cfg=cfg, outcome=outcome, name=name, step=step)
    method.prepare(job)
    solver_method = method.solver(cfg)
    kw = dict(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, act_order=cfg.act_order,
              damp=cfg.damp, method=solver_method, block_size=cfg.block_size,
              gptaq_alpha=cfg.gptaq_alpha, gptaq_update=cfg.gptaq_update)
    if solver_method == "rtn":  # no statistics: every linear is rounded as it is
        for lname, lin in linears.items():
            _solve_linear(job, lname, lin.weight.data, None, kw)
        step(f"{name}: rtn")
        return outcome

    residual = solver_method == "gptaq"  # the FP stream's inputs (X) enter D
    fp_layer = copy.deepcopy(layer)  # the FP stream's inputs of every linear come from the FP layer
    fp_linears = adapter.linears(fp_layer)
    for subset in SUBSETS:
        method.start_subset(job, subset)
        t0 = time.perf_counter()
        # a sub-block's linears read one input (SUBSETS are input-sharing groups): the forward
        # stops at the first of them, and those without token weights share their statistics
        first = {subset[0]: linears[subset[0]]}
        shared = _share_statistics(job, subset, linears, residual)
        for bi, b in enumerate(batches):
            mask = b.inputs.token_mask.to(b.x_hat.device)
            x = linear_inputs(adapter, fp_layer, b.x_fp, b.inputs,
                              {subset[0]: fp_linears[subset[0]]})[subset[0]][mask] if residual else None
            x_hat = linear_inputs(adapter, layer, b.x_hat, b.inputs, first)[subset[0]][mask]
            modality = b.modality.to(mask.device)[mask]
            added = set()
            for ln in subset:
                g = method.token_weights(job, ln, bi)
                if g is not None:
                    g = g.to(mask.device)[mask]
                if id(shared[ln]) not in added:
                    shared[ln].acc.add(x_hat, x, g)
                    added.add(id(shared[ln]))
                method.observe(job, ln, x_hat, modality, g)
        x = x_hat = None  # the last batch's inputs ([tokens, 18944] at 7B's down_proj)
        t1 = time.perf_counter()
        for ln in subset:  # one set of statistics alive at a time (GBs each at 7B/32B shapes)
            _solve_linear(job, ln, linears[ln].weight.data, shared.pop(ln), kw)
        outcome.seconds["statistics"] += t1 - t0
        outcome.seconds["solve"] += time.perf_counter() - t1
        step(f"{name}: solved {', '.join(s.rsplit('.', 1)[1] for s in subset)} ({solver_method})")
    del fp_layer
    return outcome


class _SharedStats:
    """One accumulator for the linears of a sub-block that see the same inputs and no token
    weights (GPTQ/GPTAQ's q/k/v, everyone's gate/up): accumulated and finalized once, handed to
    each of their solves; the last solve gets them consumable (so it can free the matrices)."""

    def __init__(self, acc: HessianAccumulator, users: int):
        self.acc, self.users, self._stats = acc, users, None

    def take(self, dtype: torch.dtype):
        if self._stats is None:
            self._stats = self.acc.finalize(dtype)
            self.acc = None
        self.users -= 1
        stats = self._stats
        if self.users == 0:  # the last solve may free the matrices as it goes
            stats.consumable = True
            self._stats = None
        return stats


def _share_statistics(job: LayerJob, subset: tuple[str, ...], linears: dict, residual: bool) -> dict[str, _SharedStats]:
    """Accumulators for ``subset``: one shared by the linears without token weights (their
    statistics are equal: same input, plain H), one for each linear with its own G."""
    out: dict[str, _SharedStats] = {}
    plain = [ln for ln in subset if job.cfg.strategy.token_weights(job, ln, 0) is None]
    for grp in [plain] * bool(plain) + [[ln] for ln in subset if ln not in plain]:
        lin = linears[grp[0]]
        acc = HessianAccumulator(lin.in_features, residual=residual, name=f"{job.name}.{grp[0]}",
                                 device=lin.weight.device)
        out.update(dict.fromkeys(grp, _SharedStats(acc, len(grp))))
    return out


def _solve_linear(job: LayerJob, linear: str, weight: torch.Tensor, stats: _SharedStats | None, kw: dict) -> None:
    """Solve one linear with the method's options, set its weight, record the result. The
    statistics are finalized in the solve's precision (float32, or float64 for a float64 weight)
    and handed straight to :func:`vlmq.solver.solve` (no reference kept here), so that at 7B/32B
    shapes the [in, in] matrices (1.4 / 3.1 GB each in float32 for down_proj) are freed as soon
    as the solve has its own copies."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    res = solve(weight, None if stats is None else stats.take(dtype), name=f"{job.name}.{linear}", **kw,
                **job.cfg.strategy.solve_options(job, linear))
    job.adapter.set_weight(job.layer, linear, res.dequant)
    job.cfg.strategy.finish_linear(job, linear, res)
    # the record keeps what the state stores (the dequantized weight is now the layer's own, the
    # integer codes fit a byte): at 32B shapes the full results of a layer are ~4 GB
    job.outcome.results[linear] = dataclasses.replace(res, dequant=None, int_weight=res.int_weight.to(torch.uint8))
