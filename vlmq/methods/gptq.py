"""GPTQ (symmetric: H) and GPTAQ (asymmetric: H and the residual cross term D) on the one solver."""

from __future__ import annotations

from vlmq.methods.base import QuantMethod


class GPTQ(QuantMethod):
    name = "gptq"

    def solver(self, cfg) -> str:
        return "gptq"


class GPTAQ(QuantMethod):
    name = "gptaq"

    def solver(self, cfg) -> str:
        return "gptaq"
