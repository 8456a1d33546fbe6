"""Pipeline stages: thin I/O shells over :mod:`vlmq` (one module per stage, `python -m stages.<name>`)."""
