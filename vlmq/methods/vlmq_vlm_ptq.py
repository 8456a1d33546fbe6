"""VLMQ + VLM-PTQ: VLMQ's H̃, D̃ on its precursor with VLM-PTQ's target and clipping search (the
channel energies weighted by g²)."""

from __future__ import annotations

from vlmq.methods.vlm_ptq import VLMPTQ
from vlmq.methods.vlmq import VLMQ


class VLMQWithVLMPTQ(VLMQ, VLMPTQ):
    """VLMQ's importance, precursor and token weights; VLM-PTQ's statistics, options and records."""

    name = "vlmq+vlm_ptq"
