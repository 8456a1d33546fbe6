"""The one typed schema of ``params.yaml``.

Every knob of the project lives in ``params.yaml`` and is validated here before any work starts:
an unknown key or a bad value is an error that names the key and what is allowed. Stages read
their section through :func:`load_params`; nothing else holds knobs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_PARAMS = Path(os.environ.get("VLMQ_PARAMS", "params.yaml"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantParams(_Strict):
    """Weight quantization of the language backbone's decoder linears."""

    method: Literal["rtn", "gptq", "gptaq", "awq", "mbq", "vlm_ptq", "vlmq", "vlmq+vlm_ptq"] = "vlmq"
    bits: Literal[2, 3, 4, 8] = 3
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    damp: float = Field(0.01, gt=0.0)
    block_size: int = Field(128, ge=1)
    precursor: Literal["gptq", "gptaq"] = "gptaq"

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("group_size must be -1 (per output channel) or a positive integer")
        return v


class Params(_Strict):
    seed: int = 0
    quant: QuantParams = QuantParams()


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid (the message names file and key)."""


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(data: dict, source: str | Path = "params.yaml") -> Params:
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ParamsError(_format_errors(Path(source), err)) from None


def load_params(path: str | Path | None = None) -> Params:
    path = Path(path) if path is not None else DEFAULT_PARAMS
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return parse_params(data, path)
