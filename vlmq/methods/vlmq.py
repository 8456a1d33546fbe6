"""VLMQ: token importance g (step 1) weights the Hessian statistics of the enhanced attention
projections, H̃ = X̂ᵀG²X̂ (and D̃), solved on the precursor (``quant.precursor``: GPTQ or GPTAQ).

Beyond the paper (off by default: ``importance.power`` p = 1, ``importance.floor`` β = 0), the
weights entering H̃ can be regularised (:func:`vlmq.importance.regularise`)."""

from __future__ import annotations

import torch

from vlmq.methods.base import LayerJob, QuantMethod


class VLMQ(QuantMethod):
    name = "vlmq"
    uses_importance = True

    def solver(self, cfg) -> str:
        return cfg.precursor

    def token_weights(self, job: LayerJob, linear: str, batch: int) -> torch.Tensor | None:
        short = linear.rsplit(".", 1)[1]
        cfg = job.cfg
        if short not in cfg.enhance:
            return None  # the MLP (and projections left out of `enhance`) keep the plain Hessian
        if cfg.importance_power == 1.0 and cfg.importance_floor == 0.0:
            return job.outcome.g[short][batch]  # the paper's G, untouched
        key = ("regularised", short)
        if key not in job.scratch:
            from vlmq.importance import regularise

            masks = [b.inputs.token_mask for b in job.batches]
            job.scratch[key] = regularise(job.outcome.g[short], masks, cfg.importance_power, cfg.importance_floor)
        return job.scratch[key][batch]
