"""AWQ and MBQ: per input-sharing group, a per-channel scale search (:func:`vlmq.awq.search_scales`)
folded into the op before the group, then RTN. MBQ weights the search's loss by the modality
sensitivities taken from the token importance g (step 1)."""

from __future__ import annotations

import torch
from torch import nn

from vlmq.importance import PROJECTIONS
from vlmq.methods.base import LayerJob, QuantMethod
from vlmq.quantize import SUBSETS, CalibBatch, LayerOutcome, LayerQuantConfig, linear_inputs


class AWQ(QuantMethod):
    name = "awq"

    def solver(self, cfg) -> str:
        return "rtn"  # on the scaled weights W diag(s)

    def loss_weights(self, job: LayerJob) -> dict[str, dict[str, float]] | None:
        return None

    def prepare(self, job: LayerJob) -> None:
        out = job.outcome
        out.info["scales"], out.fp_params = scale_layer(job.adapter, job.layer, job.batches, job.cfg,
                                                        loss_weights=self.loss_weights(job), name=job.name)
        job.step(f"{job.name}: {self.name} scales folded (alpha "
                 f"{[v.get('alpha') for v in out.info['scales'].values()]})")


class MBQ(AWQ):
    name = "mbq"
    uses_importance = True

    def loss_weights(self, job: LayerJob) -> dict[str, dict[str, float]] | None:
        return mbq_loss_weights(job.outcome, job.batches)


def mbq_loss_weights(outcome: LayerOutcome, batches: list[CalibBatch]) -> dict[str, dict[str, float]]:
    """MBQ's modality sensitivities per linear: the mean g over the text and over the vision tokens
    (:func:`vlmq.awq.modality_sensitivity`). q/k/v/o use their own g; the MLP linears use o_proj's,
    the gradient of the block loss at the attention block's output (the MLP's input stream)."""
    from vlmq.awq import modality_sensitivity

    mods = [b.modality for b in batches]
    masks = [b.inputs.token_mask for b in batches]
    per_proj = {n: modality_sensitivity(outcome.g[n], mods, masks) for n in PROJECTIONS if outcome.g.get(n)}
    fallback = per_proj.get("o_proj", {"text": 1.0, "vision": 1.0})
    out = {}
    for subset in SUBSETS:
        for ln in subset:
            out[ln] = per_proj.get(ln.rsplit(".", 1)[1], fallback)
    return out


@torch.no_grad()
def scale_layer(adapter, layer: nn.Module, batches: list[CalibBatch], cfg: LayerQuantConfig, *,
                loss_weights: dict[str, dict[str, float]] | None = None,
                name: str = "layer") -> tuple[dict, dict[str, torch.Tensor]]:
    """AWQ (``loss_weights`` None) / MBQ: for each input-sharing group in forward order, stream the
    group's X̂ inputs through the (still FP) layer, search α (:func:`vlmq.awq.search_scales`) and
    fold the scales into the op before the group (:meth:`ModelAdapter.fold_input_scales`). The
    layer's FP function is unchanged; its linears then hold W diag(s) for RTN. Returns the search
    record per group and the changed non-quantized parameters (name -> tensor)."""
    from vlmq.awq import ScaleStatsAccumulator, search_scales

    linears = adapter.linears(layer)
    info, changed = {}, []
    by_modality = loss_weights is not None
    for subset in SUBSETS:
        key = ",".join(ln.rsplit(".", 1)[1] for ln in subset)
        op = adapter.scale_fold_op(layer, subset)
        if op is None:
            info[key] = {"alpha": None, "skipped": "no exact fold (grouped-query attention)"}
            continue
        first = linears[subset[0]]
        acc = ScaleStatsAccumulator(first.in_features, by_modality=by_modality, name=f"{name}.{subset[0]}",
                                    device=first.weight.device)
        for b in batches:
            mask = b.inputs.token_mask.to(b.x_hat.device)
            xin = linear_inputs(adapter, layer, b.x_hat, b.inputs, {subset[0]: first})
            acc.add(xin[subset[0]][mask], b.modality.to(mask.device)[mask] if by_modality else None)
        res = search_scales({ln: linears[ln].weight.data for ln in subset}, acc.finalize(), bits=cfg.bits,
                            group_size=cfg.group_size, sym=cfg.sym, n_grid=cfg.awq_grid,
                            loss_weights=None if loss_weights is None else {ln: loss_weights[ln] for ln in subset})
        changed += adapter.fold_input_scales(layer, subset, res.scales)
        info[key] = {"alpha": res.alpha, "loss": res.loss, "loss_rtn": res.losses[0], "fold": op[0]}
        if loss_weights is not None:
            info[key]["sensitivity"] = {ln.rsplit(".", 1)[1]: loss_weights[ln] for ln in subset}
    params = {}
    for pname in dict.fromkeys(changed):
        params[pname] = layer.get_parameter(pname).detach().cpu().clone()
    return info, params
