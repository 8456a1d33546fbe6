"""Compiled CPU kernels, built on first use with ``torch.utils.cpp_extension`` (g++ and ninja).

``gptq_cpu()`` returns the extension module of ``gptq_cpu.cpp`` (fused unpack-dequantize-matmul of
GPTQ-packed 2/3/4/8-bit weights), or ``None`` when it cannot be built here (no compiler, no
ninja): the ``cpu_fused`` backend is then simply not offered. The build is cached per source,
torch version and CPU under ``$VLMQ_KERNEL_CACHE`` (default ``~/.cache/vlmq/kernels``), compiled
with ``-O3 -march=native`` for the machine it runs on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("vlmq.kernels")
SOURCE = Path(__file__).with_name("gptq_cpu.cpp")


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha1(line.encode()).hexdigest()[:10]
    except OSError:
        pass
    return platform.machine()


@lru_cache(maxsize=1)
def gptq_cpu():
    """The compiled extension, or ``None`` if it cannot be built (reason logged once)."""
    import torch

    if os.environ.get("VLMQ_DISABLE_KERNELS"):
        return None
    src = SOURCE.read_bytes()
    tag = hashlib.sha1(src + torch.__version__.encode() + _cpu_id().encode()).hexdigest()[:12]
    root = Path(os.environ.get("VLMQ_KERNEL_CACHE", Path.home() / ".cache" / "vlmq" / "kernels")) / tag
    root.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"vlmq_gptq_cpu_{tag}", sources=[str(SOURCE)], build_directory=str(root),
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler / ninja: the backend is just unavailable
        log.warning("vlmq: the cpu_fused kernel could not be built (%s: %s); using the other backends",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
