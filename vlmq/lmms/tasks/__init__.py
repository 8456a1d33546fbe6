"""lmms-eval task directory of the project (YAML + ``utils.py`` per task, not Python modules).

A package so that lmms-eval's plugin variable finds it (``LMMS_EVAL_PLUGINS=vlmq.lmms`` adds
``vlmq.lmms.tasks`` to the task search path); without the variable pass
``--include_path vlmq/lmms/tasks``.

* ``vlmq_demo`` - the demo benchmark (local Parquet ``data/demo/eval.parquet``, exact match,
  accuracy per skill);
* ``vlmq_scienceqa_img`` - ``scienceqa_img`` with the robust option-letter extraction.
"""
