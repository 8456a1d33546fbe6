"""Compiled CPU kernels, built on first use with ``torch.utils.cpp_extension`` (g++ and ninja).

``gptq_cpu()`` returns the extension module of ``gptq_cpu.cpp`` (fused unpack-dequantize-matmul of
GPTQ-packed 2/3/4/8-bit weights), or ``None`` when it cannot be built here (no compiler, no
ninja): the ``cpu_fused`` backend is then simply not offered. The build is cached per source and
torch version under ``$VLMQ_KERNEL_CACHE`` (default ``~/.cache/vlmq/kernels``).

Build flags are plain ``-O3 -fopenmp`` (no ``-march``): the one build holds an AVX-512F, an
AVX2+FMA+F16C and a portable copy of the kernel, each compiled for its own instruction set, and
:func:`kernel_isa` picks the best one this CPU runs at run time, so the same build is correct on
any x86-64 machine (and on other architectures, with the portable copy only).
``VLMQ_KERNEL_ISA=avx2`` (or ``generic``) forces a lower one; ``VLMQ_DISABLE_KERNELS=1`` turns the
kernel off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("vlmq.kernels")
SOURCE = Path(__file__).with_name("gptq_cpu.cpp")
HEADERS = (Path(__file__).with_name("gptq_cpu_body.h"),)
ISAS = ("avx512", "avx2", "generic")


@lru_cache(maxsize=1)
def gptq_cpu():
    """The compiled extension, or ``None`` if it cannot be built (reason logged once)."""
    import torch

    if os.environ.get("VLMQ_DISABLE_KERNELS"):
        return None
    src = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    tag = hashlib.sha1(src + torch.__version__.encode()).hexdigest()[:12]
    root = Path(os.environ.get("VLMQ_KERNEL_CACHE", Path.home() / ".cache" / "vlmq" / "kernels")) / tag
    root.mkdir(parents=True, exist_ok=True)
    # Build from copies inside the cache directory: the source path is then the same for every
    # checkout of the same code (ninja would rebuild for each new path, e.g. each clone or test repo).
    for f in (SOURCE, *HEADERS):
        dst = root / f.name
        if not dst.is_file() or dst.read_bytes() != f.read_bytes():
            tmp = root / f"{f.name}.{os.getpid()}.tmp"
            tmp.write_bytes(f.read_bytes())
            os.replace(tmp, dst)
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"vlmq_gptq_cpu_{tag}", sources=[str(root / SOURCE.name)], build_directory=str(root),
                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler / ninja: the backend is just unavailable
        log.warning("vlmq: the cpu_fused kernel could not be built (%s: %s); using the other backends",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def kernel_isas() -> list[str]:
    """Instruction sets the built kernel can run on this CPU, best first (empty: no kernel)."""
    mod = gptq_cpu()
    return [] if mod is None else list(mod.isas())


def kernel_isa() -> str | None:
    """The instruction set ``cpu_fused`` runs: the best one, or ``$VLMQ_KERNEL_ISA`` if set and supported."""
    ok = kernel_isas()
    if not ok:
        return None
    return _resolve(os.environ.get("VLMQ_KERNEL_ISA", "").strip().lower(), tuple(ok))


@lru_cache(maxsize=None)
def _resolve(want: str, ok: tuple[str, ...]) -> str:  # cached: the warning is logged once
    if want and want not in ok:
        log.warning("vlmq: VLMQ_KERNEL_ISA=%s is not supported here (%s); using %s", want, list(ok), ok[0])
    return want if want in ok else ok[0]
