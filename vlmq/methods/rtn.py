"""RTN: round to nearest, no error compensation (paper Eq. 11-14)."""

from __future__ import annotations

from vlmq.methods.base import QuantMethod


class RTN(QuantMethod):
    name = "rtn"

    def solver(self, cfg) -> str:
        return "rtn"
