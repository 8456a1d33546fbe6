"""Model table for lmms-eval's plugin mechanism (``LMMS_EVAL_PLUGINS=vlmq.lmms``): lmms-eval
imports ``vlmq.lmms.models`` and resolves ``vlmq`` to ``vlmq.lmms.models.vlmq.VLMQModel``."""

AVAILABLE_MODELS = {"vlmq": "VLMQModel"}
