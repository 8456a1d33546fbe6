"""The hooks a quantization method fills in (:class:`QuantMethod`) and what it sees of the layer
being quantized (:class:`LayerJob`). Defaults are the plain behaviour: no importance, no
preparation, uniform token weights, no extra statistics or solver options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class LayerJob:
    """One decoder layer in the loop: the adapter, the layer (quantized in place), the calibration
    batches, the config, the outcome being filled (``results``, ``g``, ``info``, ``fp_params``), the
    layer's name and the progress callback. ``scratch`` holds a method's per-layer working state."""

    adapter: object
    layer: torch.nn.Module
    batches: list
    cfg: object
    outcome: object
    name: str
    step: Callable[[str], None]
    scratch: dict = field(default_factory=dict)


class QuantMethod:
    """A quantization method as a strategy over :func:`vlmq.quantize.quantize_layer`."""

    name: str = ""
    uses_importance: bool = False   # step 1 (token importance g) runs before the solve

    def solver(self, cfg) -> str:
        """The solver's method: ``rtn``, ``gptq`` or ``gptaq`` (:func:`vlmq.solver.solve`)."""
        raise NotImplementedError

    def prepare(self, job: LayerJob) -> None:
        """Before any linear is solved (e.g. AWQ's scale search folded into the layer)."""

    def token_weights(self, job: LayerJob, linear: str, batch: int) -> torch.Tensor | None:
        """g [B, T] of ``linear``'s tokens in batch ``batch`` for H̃ (None = uniform)."""
        return None

    def start_subset(self, job: LayerJob, subset: tuple[str, ...]) -> None:
        """A sub-block's statistics start (before its calibration batches are streamed)."""

    def observe(self, job: LayerJob, linear: str, x_hat: torch.Tensor, modality: torch.Tensor,
                g: torch.Tensor | None) -> None:
        """One batch of ``linear``'s quantized-path inputs [tokens, in] (valid tokens only)."""

    def solve_options(self, job: LayerJob, linear: str) -> dict:
        """Extra keyword arguments of :func:`vlmq.solver.solve` for ``linear``."""
        return {}

    def finish_linear(self, job: LayerJob, linear: str, result) -> None:
        """After ``linear`` is solved (e.g. record the search's choice in ``job.outcome.info``)."""
