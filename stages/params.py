"""The one typed schema of ``params.yaml``.

Every knob of the project lives in ``params.yaml`` and is validated here before any work starts:
an unknown key or a bad value is an error that names the key and what is allowed. Stages read
their section through :func:`load_params`; nothing else holds knobs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmq.methods import METHOD_NAMES

DEFAULT_PARAMS = Path(os.environ.get("VLMQ_PARAMS", "params.yaml"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _group_size(v: int) -> int:
    if v != -1 and v < 1:
        raise ValueError("group_size must be -1 (per output channel) or a positive integer")
    return v


GroupSize = Annotated[int, AfterValidator(_group_size)]  # columns per quantization group; -1 = per channel


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
    """FP activation cache (``data/cache``): dtype of X on disk, and which layers' inputs it holds.

    ``all``: X of every decoder layer (a sweep reuses it across branches). ``first``: X of layer 0
    only, in the model's dtype; the quantize loop then carries the FP stream itself through an
    untouched FP copy of each layer (disk: one layer instead of all; results bit-identical)."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float16"
    layers: Literal["all", "first"] = "all"


class ImportanceParams(_Strict):
    """Where VLMQ's token importance G comes from (paper Sec. 4 and ablations, Tables 1, 5-8, 12).

    ``granularity`` and ``breakpoint`` choose the loss of the gradient source (Tables 7, 8; the
    other sources ignore them); ``pact_*`` are the PACT source's knobs (Table 6; defaults from
    PACT's own configuration). Definitions: ``vlmq/importance.py``."""

    source: Literal["gradient", "constant", "random", "file", "fastv", "pact"] = "gradient"
    norm: Literal["l1", "l2"] = "l1"
    enhance: list[Literal["q_proj", "k_proj", "v_proj", "o_proj"]] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    li_ratio: float = Field(0.5, ge=0.0, le=1.0)       # random: fraction of vision tokens down-weighted
    down_weight: float = Field(0.1, ge=0.0)            # random: their importance
    file: str | None = None                            # file: importance directory of an earlier run
    granularity: Literal["layer", "block", "network"] = "block"   # gradient: L_Layer | L_Block (Eq. 5) | L_Network (CE)
    breakpoint: Literal["attn_out", "o_proj_in"] = "attn_out"     # gradient, block: where L_Block is measured
    pact_keep: float = Field(0.55, gt=0.0, le=1.0)     # pact: fraction of vision tokens kept by the EUTI pruning
    pact_cutoff: float = Field(0.21, ge=0.0, le=2.0)   # pact: DBDPC cutoff (cosine distance of the keys)
    pact_coef: float = Field(1.5, ge=0.0)              # pact: pruned tokens within coef * cutoff are retrieved
    first_layer: Literal["rtn_fallback", "uniform"] = "rtn_fallback"  # gradient: the zero-loss rule (layer 0, X̂ = X)
    power: float = Field(1.0, ge=0.0)                  # G^p in H̃ = X G^{2p} Xᵀ (1 = the paper; 0.5 = X G Xᵀ)
    floor: float = Field(0.0, ge=0.0, le=1.0)          # β: g² ← (1 − β) g²/mean(g²) + β per projection and layer

    @model_validator(mode="after")
    def _breakpoint_needs_block(self):
        if self.breakpoint != "attn_out" and self.granularity != "block":
            raise ValueError(f"importance.breakpoint={self.breakpoint!r} applies to importance.granularity "
                             f"'block' only (got granularity {self.granularity!r}); use breakpoint 'attn_out'")
        return self


METHODS = METHOD_NAMES  # the registered strategies (vlmq/methods/__init__.py)
Method = Literal[METHOD_NAMES]


class AWQParams(_Strict):
    """AWQ / MBQ scale search (``vlmq/awq.py``): s = mean|x|^α, α on ``grid`` points in [0, 1]."""

    grid: int = Field(20, ge=2)


class VLMPTQParams(_Strict):
    """VLM-PTQ (``vlmq/vlm_ptq.py``, docs/vlm_ptq.md): quantization target of the column loop and
    the modality-aware clipping search of the group parameters."""

    target: Literal["corrected", "uncorrected"] = "corrected"
    vision_weight: float = Field(1.0, ge=0.0)      # β: a_c = (E_text[x²] + β E_vision[x²]) / (1 + β)
    grid: int = Field(20, ge=1)                    # clipping ratios per group (1 = plain min/max)
    max_shrink: float = Field(0.5, ge=0.0, lt=1.0)  # ratios from 1 down to 1 - max_shrink


class GPTAQParams(_Strict):
    """The GPTAQ update (``vlmq/solver.py``, docs/solver.md): ``reference`` is the GPTAQ reference
    code's P = α·triu(D Uᵀ, 1)·U (the paper's setting, α = 0.25), ``exact`` the derived full
    shift W* = W + α·W D H_λ⁻¹ (α = 1: the greedy conditional optimum). α = 0 is GPTQ."""

    alpha: float = Field(0.25, ge=0.0)
    update: Literal["reference", "exact"] = "reference"


class QuantParams(_Strict):
    """Weight quantization of the language backbone's decoder linears."""

    method: Method = "vlmq"
    bits: Literal[2, 3, 4, 8] = 3
    group_size: GroupSize = 128
    sym: bool = False
    act_order: bool = True
    damp: float = Field(0.01, gt=0.0)
    block_size: int = Field(128, ge=1)
    precursor: Literal["gptq", "gptaq"] = "gptaq"
    gptaq: GPTAQParams = GPTAQParams()
    awq: AWQParams = AWQParams()
    vlm_ptq: VLMPTQParams = VLMPTQParams()


class PackParams(_Strict):
    """Packing the quantize run into a GPTQ-layout checkpoint (``stages.pack``)."""

    out_dir: str = "data/packed"
    checkpoint_format: Literal["auto", "gptq", "gptq_v2"] = "auto"  # auto: v1 unless a zero point is 0


Batches = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]  # rows per call (M)


class LatencySweepParams(_Strict):
    """The long batch sweep (``python -m benchmarks.latency --sweep``): a committed report + plot."""

    batches: Batches = [1, 4, 16, 64, 256, 1024]
    runs: int = Field(7, ge=3)                    # in place of latency.runs / seconds_per_row: the
    seconds_per_row: float = Field(3.0, gt=0)     # long calls of many rows need more runs than 3
    out: str = "reports/bench/latency_sweep.json"
    plot: str = "reports/bench/latency_sweep.png"


class LatencyParams(_Strict):
    """Kernel-backed latency benchmark (``stages.latency`` / ``benchmarks/latency.py``)."""

    shapes: Annotated[list[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]], Field(min_length=1)] = [
        (3584, 4608), (3584, 3584), (3584, 18944), (3584, 37888), (18944, 3584)]  # (in, out)
    bits: Annotated[list[Literal[2, 3, 4, 8]], Field(min_length=1)] = [4, 3, 2]
    group_size: GroupSize = 128
    batches: Batches = [1, 16]  # rows per call
    cache: Annotated[list[Literal["cold", "warm"]], Field(min_length=1)] = ["cold", "warm"]
    cold_llc_factor: float = Field(2.0, ge=1.0)   # cold: the rotated copies hold >= this x the LLC
    cold_ram_fraction: float = Field(0.1, gt=0, le=0.5)  # ... and at most this share of available RAM
    dense_dtypes: list[Literal["float32", "bfloat16", "float16"]] = ["float32", "bfloat16", "float16"]
    backends: list[Literal["auto", "aten_int4", "cpu_fused", "cpu_tiled", "cpu_tiled_bf16", "dequant", "reference"]] = [
        "auto", "cpu_fused", "cpu_tiled", "cpu_tiled_bf16", "aten_int4"]
    prefill_from: int = Field(16, ge=1)  # backend auto: calls with >= this many rows run cpu_tiled
    runs: int = Field(10, ge=3)
    warmup: int = Field(2, ge=0)
    seconds_per_row: float = Field(1.0, gt=0)  # fewer runs (>= 3) where one call is slow
    slow_factor: float = Field(2.0, ge=1.0)  # a variant whose first call takes > this x the fastest dense one: timed once
    threads: int | None = Field(None, ge=1)  # torch threads (null = torch's default)
    decode_tokens: int = Field(32, ge=1)   # end to end: greedy tokens after the first, batch 1
    decode_runs: int = Field(5, ge=1)
    out: str = "reports/latency.json"
    sweep: LatencySweepParams = LatencySweepParams()


class DemoDataParams(_Strict):
    """The rendered visual-QA dataset of the embedded demo model (``stages.demo_data``)."""

    seed: int = 0
    n_train: int = Field(30000, ge=1)          # train images (one row each, one question per skill)
    n_calib: int = Field(256, ge=1)            # calibration images (instruction + caption)
    eval_per_skill: int = Field(200, ge=1)     # held-out questions per skill
    val_per_skill: int = Field(0, ge=0)        # validation questions per skill (0 = no val split)
    grid: int = Field(8, ge=2)                 # cells per side; a cell is one merged vision token
    cell: int = Field(28, ge=14)               # pixels per cell (28 = 14-px patches, 2x2 merge)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(6, ge=1)
    min_code: int = Field(3, ge=1)             # characters of the rendered text code
    max_code: int = Field(4, ge=1)
    jitter: int = Field(3, ge=0)               # max shape offset from the cell centre (px)
    count_kinds: list[Literal["all", "color", "shape"]] = Field(["all", "color", "shape"], min_length=1)
    # what "How many ...?" questions (count skill and mcq) count: all shapes, a colour, a shape


class DemoModelParams(_Strict):
    """Shape of the demo Qwen2-VL (every decoder linear in-dimension a multiple of 128)."""

    vocab_size: int = Field(512, ge=300)       # BPE training target (special tokens included)
    hidden_size: int = Field(256, ge=128)
    intermediate_size: int = Field(768, ge=128)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    mrope_section: list[int] = [8, 12, 12]     # temporal/height/width halves of head_dim/2
    vision_depth: int = Field(2, ge=1)
    vision_embed_dim: int = Field(128, ge=16)
    vision_heads: int = Field(4, ge=1)
    rope_theta: float = Field(10000.0, gt=0.0)  # decoder RoPE base (M-RoPE's width section gets its lowest frequencies)

    @field_validator("hidden_size", "intermediate_size")
    @classmethod
    def _multiple_of_128(cls, v: int) -> int:
        if v % 128:
            raise ValueError("must be a multiple of 128 (decoder linear in-dimensions, group size 128)")
        return v


class DemoTrainParams(_Strict):
    """CPU training of the demo model (``stages.demo_model``)."""

    seed: int = 0
    threads: int = Field(2, ge=1)              # fixed torch thread count (determinism)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(12, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    warmup: int = Field(60, ge=0)
    min_lr_frac: float = Field(0.05, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_turns: int = Field(1, ge=1)            # questions about one image per training sequence
    aux_weight: float = Field(0.5, ge=0.0)     # weight of the training-only per-token heads
    aux_layer: int = Field(2, ge=1)            # LM hidden state probed by the auxiliary heads
    qk_init_std: float = Field(0.05, ge=0.0)   # 0 = keep the default init of q/k projections
    grad_clip: float = Field(1.0, gt=0.0)
    log_every: int = Field(100, ge=1)
    holdout: int = Field(40, ge=0)             # train images held out to monitor accuracy
    curriculum_steps: int = Field(350, ge=0)   # first steps: scenes with 1 -> max shapes
    save_every: int = Field(200, ge=0)         # monitoring checkpoint <out_dir>/model.ckpt (0 = none)
    attn_weight: float = Field(1.0, ge=0.0)    # supervision of 2 heads' attention at answer tokens (0 = off)
    attn_layer: int = Field(2, ge=0)           # decoder layer whose heads 0/1 are supervised
    latent_weight: float = Field(0.0, ge=0.0)  # probes of what the answer is computed from, at the answer token
    latent_start: int = Field(0, ge=0)         # step from which latent/value/option supervision and count_target are on
    vision_warmup_steps: int = Field(300, ge=0)  # vision tower + merger alone on the per-cell probes first
    count_target: Literal["vision_end", "objects"] = "vision_end"  # where count answers' heads 0/1 look
    value_weight: float = Field(0.0, ge=0.0)   # probes of cell row/column and option letter on heads 0/1's values
    option_weight: float = Field(0.0, ge=0.0)  # multiple choice: next layer's heads 0/1 onto the right option's text
    route_weight: float = Field(0.0, ge=0.0)   # heads 0/1 of the layer before attn_layer onto the words the question names
    tokenizer_calib_rows: int | None = Field(None, ge=0)  # calib captions the tokenizer is trained on (null = all)


class DemoParams(_Strict):
    """The embedded default model: rendered visual-QA data + a tiny Qwen2-VL trained on it."""

    out_dir: str = "data/demo"
    data: DemoDataParams = DemoDataParams()
    model: DemoModelParams = DemoModelParams()
    train: DemoTrainParams = DemoTrainParams()

    @model_validator(mode="after")
    def _layers(self) -> "DemoParams":
        t, n = self.train, self.model.num_layers
        if t.attn_layer >= n or t.aux_layer > n:
            raise ValueError(f"train.attn_layer ({t.attn_layer}) and train.aux_layer ({t.aux_layer}) must be "
                             f"decoder layers of model.num_layers = {n}")
        if (t.option_weight > 0 or t.value_weight > 0 or t.latent_weight > 0) and t.attn_layer + 1 >= n:
            raise ValueError(f"train.option_weight/value_weight/latent_weight supervise layer attn_layer + 1 = "
                             f"{t.attn_layer + 1}, which model.num_layers = {n} does not have")
        if t.route_weight > 0 and t.attn_layer < 1:
            raise ValueError("train.route_weight supervises the layer before train.attn_layer; attn_layer must be >= 1")
        return self


class SweepPoint(_Strict):
    """One extra (bits, group size) setting of the sweep, run for every method."""

    bits: Literal[2, 3, 4, 8]
    group_size: GroupSize


class SweepParams(_Strict):
    """The grid of the sweep flow (``python -m pipeline.sweep``): independent quantize → evaluate
    branches on Prefect's task runner (threads, or a Dask cluster with ``prefect-dask``)."""

    methods: list[Method] = ["rtn", "gptq", "gptaq", "vlmq"]
    bits: list[Literal[2, 3, 4, 8]] = [3, 2]
    group_sizes: list[GroupSize] = [128]
    extra_points: list[SweepPoint] = []   # settings besides bits x group_sizes (e.g. per-channel W3)
    importance: list[Literal["gradient", "constant", "random", "fastv", "pact"]] = ["gradient"]
    gptq_precursor_at_2bit: bool = True   # the paper's ‡ rows: VLMQ on GPTQ at 2 bits
    extra_branches: list[dict[str, dict]] = []  # more branches: params overrides, e.g.
                                          # {quant: {method: vlmq, bits: 3}, importance: {power: 0.5}}
    engine: Literal["threads", "dask"] = "threads"
    workers: int = Field(1, ge=1)
    torch_threads: int = Field(1, ge=1)   # torch threads per branch; the W2 results depend on it (README)
    dask_address: str | None = None       # an existing Dask scheduler, e.g. tcp://10.0.0.5:8786


PAPER_TASKS = ["chartqa", "docvqa_val", "mmerealworld", "mmerealworld_cn", "ocrbench", "scienceqa_img",
               "seedbench_2_plus", "textvqa_val"]


class EvalParams(_Strict):
    """Evaluation with lmms-eval (``stages.evaluate``): the FP model and the quantize run.

    ``tasks`` are lmms-eval task names: the project's (``vlmq/lmms/tasks``: ``vlmq_demo``) or
    lmms-eval's built-ins (their data must already be in the local HF cache: nothing is
    downloaded). ``paper_tasks`` is the paper's eight benchmarks, for ``tasks: paper``."""

    tasks: list[str] | Literal["paper"] = ["vlmq_demo"]
    paper_tasks: list[str] = PAPER_TASKS          # ChartQA, DocVQA val, MME-RealWorld en/cn, OCRBench,
                                                  # ScienceQA-IMG, SEED-Bench-2-Plus, TextVQA val
    limit: int | None = Field(None, ge=1)         # first N questions per task (testing only)
    batch_size: int = Field(1, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)  # null = each task's own (vlmq_demo: 16)
    demo_eval: str = "data/demo/eval.parquet"     # data file of the vlmq_demo task
    scienceqa_robust_extraction: bool = False     # scienceqa_img scored with the paper's robust
                                                  # option-letter extraction (App. E.1)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("at least one task")
        return v

    def task_list(self) -> list[str]:
        """The tasks to run (``paper`` expanded, ScienceQA swapped for the robust variant)."""
        tasks = list(self.paper_tasks) if self.tasks == "paper" else list(self.tasks)
        if self.scienceqa_robust_extraction:
            tasks = ["vlmq_scienceqa_img" if t == "scienceqa_img" else t for t in tasks]
        return list(dict.fromkeys(tasks))


class Params(_Strict):
    seed: int = 0
    model: ModelParams = ModelParams()
    calib: CalibParams = CalibParams()
    cache: CacheParams = CacheParams()
    quant: QuantParams = QuantParams()
    pack: PackParams = PackParams()
    latency: LatencyParams = LatencyParams()
    demo: DemoParams = DemoParams()
    importance: ImportanceParams = ImportanceParams()
    sweep: SweepParams = SweepParams()
    eval: EvalParams = EvalParams()


def run_name(params: "Params") -> str:
    """Name of the quantized configuration, e.g. ``vlmq-w3g128`` (precursor and importance source
    appended when not the defaults): used for ``reports/eval/<run>/`` and the report rows."""
    from vlmq.methods import get_method

    q = params.quant
    gs = "c" if q.group_size == -1 else f"g{q.group_size}"
    name = f"{q.method}-w{q.bits}{gs}"
    if q.method in ("vlmq", "vlmq+vlm_ptq") and q.precursor != "gptaq":
        name += f"-{q.precursor}"
    if get_method(q.method).solver(q) == "gptaq":  # a non-default GPTAQ update
        if q.gptaq.update != GPTAQParams().update:
            name += f"-{q.gptaq.update}"
        if q.gptaq.alpha != GPTAQParams().alpha:
            name += f"-a{q.gptaq.alpha:g}"
    if q.method in ("vlm_ptq", "vlmq+vlm_ptq") and q.vlm_ptq.target != "corrected":
        name += f"-{q.vlm_ptq.target}"
    if q.method in ("vlmq", "mbq", "vlmq+vlm_ptq"):
        imp = params.importance
        if imp.source != "gradient":
            name += f"-{imp.source}"
        if imp.source == "random":  # VLMQ-naive grid (Tables 1, 5): LI ratio x down-weight factor
            name += f"-li{imp.li_ratio:g}-dw{imp.down_weight:g}"
        if imp.source == "gradient":  # loss granularity (Table 7) and breakpoint (Table 8)
            if imp.granularity != "block":
                name += f"-{imp.granularity}"
            if imp.breakpoint != "attn_out":
                name += f"-{imp.breakpoint}"
        if imp.norm != "l1":
            name += f"-{imp.norm}"
        if imp.source == "gradient" and imp.first_layer != "rtn_fallback":
            name += f"-first_{imp.first_layer}"
        if imp.power != 1.0:
            name += f"-p{imp.power:g}"
        if imp.floor != 0.0:
            name += f"-fl{imp.floor:g}"
        if list(imp.enhance) != ["q_proj", "k_proj", "v_proj", "o_proj"]:
            name += "-enh_" + "".join(e[0] for e in imp.enhance)
    if q.sym:
        name += "-sym"
    return name


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
