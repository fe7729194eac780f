"""Memory guard: refuse a decomposition whose working memory would not fit, before allocating.

Each algorithm has a pure ``estimate_*_memory`` function (in its own module) that adds up its
largest simultaneous buffers from the shape and rank alone; it then calls :func:`check_memory`,
which compares the estimate with a limit:

1. ``limit_bytes`` when given (the algorithms' ``memory_limit_bytes`` argument), else
2. the environment variable ``FACTLIN_MEMORY_LIMIT_BYTES`` when set, else
3. half of the memory available on the device (``MemAvailable`` of ``/proc/meminfo`` on the
   host, free plus reusable cached memory on a CUDA device).

Examples
--------
>>> check_memory(1 << 20, what="a small job", advice="none needed", limit_bytes=1 << 30)
>>> check_memory(
...     1 << 40, what="a huge job", advice="Ask for less.", limit_bytes=1 << 30
... )  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
factlin.decompositions.memory.MemoryLimitError: a huge job needs an estimated 1.0 TiB ...
"""

from __future__ import annotations

import numbers
import os
import sys

import torch

from ..errors import FactlinError, describe

__all__ = [
    "MEMORY_LIMIT_ENV",
    "MemoryLimitError",
    "available_memory_bytes",
    "check_memory",
    "format_bytes",
    "memory_limit_bytes",
]

#: Environment variable overriding the default limit (an int number of bytes).
MEMORY_LIMIT_ENV = "FACTLIN_MEMORY_LIMIT_BYTES"

#: Fraction of the available memory used as the default limit.
DEFAULT_FRACTION = 0.5


class MemoryLimitError(FactlinError):
    """A decomposition whose estimated working memory exceeds the limit.

    Attributes
    ----------
    estimate_bytes : int
        The estimated peak working memory.
    limit_bytes : int
        The limit it was compared with.
    """

    def __init__(self, message: str, estimate_bytes: int = 0, limit_bytes: int = 0) -> None:
        super().__init__(message)
        self.estimate_bytes = estimate_bytes
        self.limit_bytes = limit_bytes

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:
        return (type(self), (str(self), self.estimate_bytes, self.limit_bytes))


def format_bytes(n_bytes: int) -> str:
    """Human-readable size: ``'1.5 GiB'``, ``'12.0 MiB'``, ``'512 B'``."""
    for unit, power in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n_bytes >= 1 << power:
            return f"{n_bytes / (1 << power):.1f} {unit}"
    return f"{n_bytes} B"


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return sys.maxsize  # unknown: no limit


def available_memory_bytes(device: torch.device | str | None = None) -> int:
    """Memory currently available for new tensors on ``device``, in bytes.

    Parameters
    ----------
    device : torch.device or str, optional
        ``None``, ``'cpu'`` and ``'meta'`` (and devices without a query) read host memory:
        ``MemAvailable`` from ``/proc/meminfo``, else ``os.sysconf``; ``sys.maxsize`` if neither
        works. A CUDA device reports free memory plus memory cached by PyTorch's allocator but
        not in use.

    Returns
    -------
    int
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(0, int(reusable))
    return _host_available_bytes()


def _check_limit_value(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={describe(value)}: expected a positive int number of bytes")
    if value < 1:
        raise FactlinError(f"{name}={value}: expected a positive int number of bytes")
    return int(value)


def memory_limit_bytes(
    limit_bytes: int | None = None, device: torch.device | str | None = None
) -> tuple[int, str]:
    """The limit that :func:`check_memory` applies, and where it comes from.

    Returns
    -------
    (limit, source) : tuple of int and str
    """
    if limit_bytes is not None:
        return _check_limit_value("memory_limit_bytes", limit_bytes), "memory_limit_bytes"
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env is not None and env.strip():
        try:
            value = int(env.strip())
        except ValueError:
            raise FactlinError(
                f"environment variable {MEMORY_LIMIT_ENV}={env!r}: expected a positive int "
                "number of bytes"
            ) from None
        return _check_limit_value(MEMORY_LIMIT_ENV, value), MEMORY_LIMIT_ENV
    available = available_memory_bytes(device)
    where = "cpu" if device is None else str(device)
    limit = int(available * DEFAULT_FRACTION)
    return limit, (
        f"{DEFAULT_FRACTION:.0%} of the {format_bytes(available)} available on {where}; set "
        f"memory_limit_bytes or {MEMORY_LIMIT_ENV} to change it"
    )


def check_memory(
    estimate_bytes: int,
    *,
    what: str,
    advice: str,
    limit_bytes: int | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Raise :class:`MemoryLimitError` if ``estimate_bytes`` exceeds the memory limit.

    Parameters
    ----------
    estimate_bytes : int
        Estimated peak working memory of the job.
    what : str
        The job, as the message should name it (e.g. ``"cp_als(shape=(16, 16), rank=9)"``).
    advice : str
        What the caller can do instead (e.g. ``"lower the rank"``).
    limit_bytes : int, optional
        Explicit limit; else ``FACTLIN_MEMORY_LIMIT_BYTES``, else half the available memory.
    device : torch.device or str, optional
        Where the job runs (``meta`` is checked against host memory).

    Raises
    ------
    MemoryLimitError
        If the estimate exceeds the limit.
    """
    limit, source = memory_limit_bytes(limit_bytes, device)
    if estimate_bytes > limit:
        raise MemoryLimitError(
            f"{what} needs an estimated {format_bytes(estimate_bytes)} of working memory, "
            f"above the limit of {format_bytes(limit)} ({source}). {advice}",
            estimate_bytes,
            limit,
        )
