"""Time guard: refuse a decomposition whose estimated run time exceeds a limit, before starting.

The companion of :mod:`factlin.decompositions.memory`. An algorithm that can run for long (today
:func:`~factlin.decompositions.cp_als`, whose sweeps cost ``O(numel * R)`` each) estimates its
worst-case time from the shape, rank and options alone (a FLOP count divided by the device's
rate, :func:`flops_per_second`) and calls :func:`check_time`, which compares the estimate with
a limit:

1. ``limit_seconds`` when given (the algorithms' ``time_limit_seconds`` argument), else
2. the environment variable ``FACTLIN_TIME_LIMIT_SECONDS`` when set, else
3. :data:`DEFAULT_TIME_LIMIT_SECONDS` (10 minutes).

The estimate is an upper bound of the kind "every sweep runs": a run that stops early on its
tolerance takes less. The rates are deliberately modest (a busy machine); a request refused
here can always be made with a larger limit, or bounded with ``max_seconds``.

Examples
--------
>>> check_time(5.0, what="a short job", advice="none needed", limit_seconds=60)
>>> check_time(
...     7200.0, what="a long job", advice="Ask for less.", limit_seconds=600
... )  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
factlin.decompositions.budget.TimeLimitError: a long job would take an estimated 2.0 h, above ...
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from ..errors import FactlinError, describe

__all__ = [
    "CPU_FLOPS_PER_THREAD",
    "CUDA_FLOPS",
    "DEFAULT_TIME_LIMIT_SECONDS",
    "TIME_LIMIT_ENV",
    "TimeLimitError",
    "check_time",
    "flops_per_second",
    "format_seconds",
    "time_limit_seconds",
]

#: Environment variable overriding the default limit (a number of seconds).
TIME_LIMIT_ENV = "FACTLIN_TIME_LIMIT_SECONDS"

#: Default limit: 10 minutes.
DEFAULT_TIME_LIMIT_SECONDS = 600.0

#: Sustained float32 rate assumed per CPU thread (GEMM-heavy work, a shared machine). Measured
#: 14-60 GFLOP/s per thread on this project's 2-core AMD EPYC machine depending on load.
CPU_FLOPS_PER_THREAD = 20e9

#: Sustained float32 rate assumed on a CUDA device (far below an H200's peak: the blocked ALS
#: sweeps are launch- and memory-bound at these sizes).
CUDA_FLOPS = 10e12


class TimeLimitError(FactlinError):
    """A decomposition whose estimated run time exceeds the limit.

    Attributes
    ----------
    estimate_seconds : float
        The estimated (worst-case) run time.
    limit_seconds : float
        The limit it was compared with.
    """

    def __init__(
        self, message: str, estimate_seconds: float = 0.0, limit_seconds: float = 0.0
    ) -> None:
        super().__init__(message)
        self.estimate_seconds = estimate_seconds
        self.limit_seconds = limit_seconds

    def __reduce__(self) -> tuple[type, tuple[str, float, float]]:
        return (type(self), (str(self), self.estimate_seconds, self.limit_seconds))


def format_seconds(seconds: float) -> str:
    """Human-readable duration: ``'0.25 s'``, ``'12 s'``, ``'3.5 min'``, ``'2.0 h'``."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    if seconds >= 10:
        return f"{seconds:.0f} s"
    return f"{seconds:.2g} s"


def flops_per_second(device: torch.device | str | None = None) -> float:
    """The float32 rate assumed on ``device``: :data:`CUDA_FLOPS` on CUDA, else
    :data:`CPU_FLOPS_PER_THREAD` times ``torch.get_num_threads()``."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        return CUDA_FLOPS
    return CPU_FLOPS_PER_THREAD * max(1, torch.get_num_threads())


def check_seconds(name: str, value: object) -> float:
    """A finite number of seconds ``> 0`` (bools rejected), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={describe(value)}: expected a positive number of seconds")
    if not math.isfinite(float(value)) or value <= 0:
        raise FactlinError(f"{name}={value}: expected a finite number of seconds > 0")
    return float(value)


def time_limit_seconds(limit_seconds: float | None = None) -> tuple[float, str]:
    """The limit that :func:`check_time` applies, and where it comes from.

    Returns
    -------
    (limit, source) : tuple of float and str
    """
    if limit_seconds is not None:
        return check_seconds("time_limit_seconds", limit_seconds), "time_limit_seconds"
    env = os.environ.get(TIME_LIMIT_ENV)
    if env is not None and env.strip():
        try:
            value = float(env.strip())
        except ValueError:
            raise FactlinError(
                f"environment variable {TIME_LIMIT_ENV}={env!r}: expected a positive number "
                "of seconds"
            ) from None
        return check_seconds(TIME_LIMIT_ENV, value), TIME_LIMIT_ENV
    return DEFAULT_TIME_LIMIT_SECONDS, (
        f"the default; set time_limit_seconds or {TIME_LIMIT_ENV} to change it"
    )


def check_time(
    estimate_seconds: float,
    *,
    what: str,
    advice: str,
    limit_seconds: float | None = None,
) -> None:
    """Raise :class:`TimeLimitError` if ``estimate_seconds`` exceeds the time limit.

    Parameters
    ----------
    estimate_seconds : float
        Estimated (worst-case) run time of the job.
    what : str
        The job, as the message should name it.
    advice : str
        What the caller can change (e.g. ``"pass max_seconds=60"``).
    limit_seconds : float, optional
        Explicit limit; else ``FACTLIN_TIME_LIMIT_SECONDS``, else 10 minutes.

    Raises
    ------
    TimeLimitError
        If the estimate exceeds the limit.
    """
    limit, source = time_limit_seconds(limit_seconds)
    if estimate_seconds > limit:
        raise TimeLimitError(
            f"{what} would take an estimated {format_seconds(estimate_seconds)}, above the "
            f"limit of {format_seconds(limit)} ({source}). {advice}",
            float(estimate_seconds),
            limit,
        )
