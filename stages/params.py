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


class ModelParams(_Strict):
    """Which model to quantize. The default is the embedded demo model committed in the repo;
    point ``path`` at a local Hugging Face directory (safetensors) for a real checkpoint."""

    path: str = "data/demo/model"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"


class CalibParams(_Strict):
    """Calibration data (paper Appendix E: 512 samples, max length 512 for Qwen2-VL, 986 for
    LLaVA-OneVision; samples whose vision segment would be cut are dropped)."""

    source: str = "data/demo/calib.parquet"  # local Parquet file or `datasets` save_to_disk dir
    image_column: str = "image"
    prompt_column: str = "question"
    answer_column: str = "answer"
    system_prompt: str | None = None
    n_samples: int = Field(64, ge=1)
    max_length: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class CacheParams(_Strict):
    """FP activation cache (``data/cache``): dtype of X on disk."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float16"


class ImportanceParams(_Strict):
    """Where VLMQ's token importance G comes from (paper Sec. 4 and ablations, Tables 1, 5, 12)."""

    source: Literal["gradient", "constant", "random", "file"] = "gradient"
    norm: Literal["l1", "l2"] = "l1"
    enhance: list[Literal["q_proj", "k_proj", "v_proj", "o_proj"]] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    li_ratio: float = Field(0.5, ge=0.0, le=1.0)       # random: fraction of vision tokens down-weighted
    down_weight: float = Field(0.1, ge=0.0)            # random: their importance
    file: str | None = None                            # file: importance directory of an earlier run


class QuantParams(_Strict):
    """Weight quantization of the language backbone's decoder linears."""

    method: Literal["rtn", "gptq", "gptaq", "vlmq"] = "vlmq"
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
    model: ModelParams = ModelParams()
    calib: CalibParams = CalibParams()
    cache: CacheParams = CacheParams()
    quant: QuantParams = QuantParams()
    importance: ImportanceParams = ImportanceParams()


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
