"""lmms-eval integration: the ``vlmq`` model type, the task directory and helpers.

* :class:`vlmq.lmms.models.vlmq.VLMQModel` - lmms-eval model type ``vlmq`` (FP or fake-quantized
  local checkpoints; loaders are pluggable, :mod:`vlmq.lmms.loaders`);
* :data:`TASKS_DIR` - ``vlmq/lmms/tasks/`` (``--include_path``): ``vlmq_demo`` (the demo
  benchmark, offline Parquet) and ``vlmq_scienceqa_img`` (robust option-letter scoring);
* :func:`vlmq.lmms.scienceqa.extract_option_letter` - paper Appendix E.1 extraction;
* :func:`manifest` - an lmms-eval model manifest, for the ``lmms_eval.models`` entry-point group.

The CLI finds the model type (and the tasks) through lmms-eval's plugin variable::

    LMMS_EVAL_PLUGINS=vlmq.lmms python -m lmms_eval --model vlmq \\
        --model_args pretrained=data/demo/model --include_path vlmq/lmms/tasks --tasks vlmq_demo

(``@register_model`` alone is not enough in lmms-eval 0.7.3: the CLI resolves names through
its manifest registry, which only reads built-ins, ``LMMS_EVAL_PLUGINS`` and entry points.)
In Python, pass a :class:`VLMQModel` instance to ``lmms_eval.evaluator.simple_evaluate``.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def quiet_logs(level: str = "WARNING") -> None:
    """Route lmms-eval's loguru output to stderr at ``level`` (its default handler logs DEBUG)."""
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=level)


def manifest():
    """``ModelManifest`` of the ``vlmq`` model type (entry point payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmq", simple_class_path="vlmq.lmms.models.vlmq.VLMQModel")
