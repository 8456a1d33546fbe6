"""VLM-PTQ: GPTAQ with the corrected target and a per-group clipping search weighted by the
modality-balanced channel importance (:mod:`vlmq.vlm_ptq`, docs/vlm_ptq.md)."""

from __future__ import annotations

import torch

from vlmq.methods.base import LayerJob, QuantMethod


class VLMPTQ(QuantMethod):
    name = "vlm_ptq"

    def solver(self, cfg) -> str:
        return "gptaq"

    def start_subset(self, job: LayerJob, subset: tuple[str, ...]) -> None:
        from vlmq.vlm_ptq import ModalityChannelStats

        linears = job.adapter.linears(job.layer)
        job.scratch["channels"] = {ln: ModalityChannelStats(linears[ln].in_features, name=f"{job.name}.{ln}",
                                                            device=linears[ln].weight.device) for ln in subset}

    def observe(self, job: LayerJob, linear: str, x_hat: torch.Tensor, modality: torch.Tensor,
                g: torch.Tensor | None) -> None:
        job.scratch["channels"][linear].add(x_hat, modality, g)

    def solve_options(self, job: LayerJob, linear: str) -> dict:
        from vlmq.vlm_ptq import clip_ratios

        cfg = job.cfg
        return {"target": cfg.vlm_ptq_target, "clip_ratios": clip_ratios(cfg.vlm_ptq_grid, cfg.vlm_ptq_max_shrink),
                "channel_importance": job.scratch["channels"][linear].importance(cfg.vlm_ptq_vision_weight)}

    def finish_linear(self, job: LayerJob, linear: str, result) -> None:
        r = result.clip_ratio
        job.outcome.info.setdefault("clip", {})[linear] = {"mean_ratio": float(r.mean()),
                                                           "clipped_fraction": float((r < 1.0).double().mean())}
