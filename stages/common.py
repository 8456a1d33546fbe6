"""Shared I/O helpers of the stages: atomic writes, offline environment, logging, resources."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (which test harnesses and notebooks replace)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def get_logger(name: str) -> logging.Logger:
    """Prefect's run logger inside a flow/task run, the standard logger elsewhere."""
    if "prefect" in sys.modules:  # a run needs prefect imported; importing it here would cost ~1.5 s per stage
        try:
            from prefect import get_run_logger
            from prefect.context import TaskRunContext, FlowRunContext

            if TaskRunContext.get() or FlowRunContext.get():
                return get_run_logger()  # type: ignore[return-value]
        except Exception:  # no active run
            pass
    logger = logging.getLogger(f"vlmq.stages.{name}")
    if not logger.handlers:  # stages always report at INFO, whatever the root logger's config
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` (files or
    directories), on error removed: readers never see a half-written artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.is_dir() and tmp_path.is_dir():
            import shutil

            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp_path, path)
    except BaseException:
        if tmp_path.is_dir():
            import shutil

            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def write_parquet(df, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def stage_timer(log: logging.Logger, stage: str) -> Iterator[dict]:
    """Log start/end and wall time of a stage; the yielded dict collects 'read'/'wrote' paths."""
    info: dict[str, Any] = {"read": [], "wrote": []}
    t0 = time.perf_counter()
    log.info("%s: start", stage)
    yield info
    info["seconds"] = time.perf_counter() - t0
    log.info("%s: read %s", stage, ", ".join(map(str, info["read"])) or "-")
    log.info("%s: wrote %s", stage, ", ".join(map(str, info["wrote"])) or "-")
    log.info("%s: done in %.1f s (peak RSS %.0f MiB)", stage, info["seconds"], peak_rss_mb())


def dir_size_mb(path: str | Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


# ----------------------------------------------------------------------------- model directory
def model_path(params, processor: bool = False) -> str:
    """``model.path`` after checking, before any model work, that it is a loadable local model
    directory (``config.json`` of a supported architecture, safetensors weights; with
    ``processor``, the tokenizer / image-processor files too). Nothing is ever downloaded, so a
    bad path is a one-line error naming ``model.path`` and the path, not a hub lookup."""
    from vlmq.models import ModelLoadError, check_model_dir
    from vlmq.models.loading import PROCESSOR_FILES

    path = Path(params.model.path)
    hint = "(a local Hugging Face model directory: config.json + *.safetensors; nothing is downloaded)"
    try:
        check_model_dir(path)
    except ModelLoadError as err:
        raise ValueError(f"model.path: {path}: {'; '.join(err.problems)} {hint}") from err
    if processor and not any((path / f).is_file() for f in PROCESSOR_FILES):
        raise ValueError(f"model.path: {path}: no processor files (one of {', '.join(PROCESSOR_FILES)}) {hint}")
    return str(path)


# ----------------------------------------------------------------------------- command line
USER_ERRORS = (ValueError, OSError)  # bad params/config values (ParamsError is a ValueError), missing or bad files


def call(name: str, fn, *args: Any, **kwargs: Any) -> Any:
    """The plain stage runner: ``fn(*args, **kwargs)`` (``pipeline.run`` passes a Prefect one)."""
    return fn(*args, **kwargs)


def stage_parser(doc: str | None, params: bool = True):
    """The argument parser of a stage's command line: ``--params`` (the params file, default
    params.yaml) and ``--debug`` (show the traceback of an error)."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    if params:
        ap.add_argument("--params", default=None, help="the params file (default params.yaml)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (or VLMQ_DEBUG=1)")
    return ap


def run_cli(main, argv: list[str] | None = None) -> Any:
    """Run a stage's ``main(argv)``: a params, config or input error prints as one line on stderr
    (``error: <file or key>: <what is wrong>``) and exits with code 2, with no traceback unless
    ``--debug`` is on the command line or ``VLMQ_DEBUG=1``."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("VLMQ_DEBUG", "0") == "1"
    try:
        return main(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        msg = "; ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
        print(f"error: {msg or type(err).__name__} (--debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
