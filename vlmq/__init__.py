"""Core math of the VLMQ pipeline: quantizer, streaming Hessian statistics, the one solver
(RTN / GPTQ / GPTAQ / importance-weighted VLMQ), importance factors and model adapters.

This package imports only torch, transformers and safetensors: no Prefect, no DVC, no pandas.
"""

__version__ = "0.1.0"
