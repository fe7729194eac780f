"""Tensor decompositions in pure PyTorch: CP-ALS, Tucker (HOSVD/HOOI) and TT-matrix SVD.

Every algorithm is a pure function (tensor in, factors and diagnostics out), computes on the
input's device in float32 or float64 (float16/bfloat16 are upcast, results cast back), draws
randomness only from an explicit seed or ``torch.Generator``, and checks its estimated working
memory against a limit before allocating (:mod:`factlin.decompositions.memory`).
"""

from __future__ import annotations

from .budget import TIME_LIMIT_ENV, TimeLimitError, check_time
from .cp_als import (
    CPDecomposition,
    cp_als,
    cp_to_tensor,
    estimate_cp_als_memory,
    estimate_cp_als_seconds,
)
from .memory import (
    MEMORY_LIMIT_ENV,
    MemoryLimitError,
    available_memory_bytes,
    check_memory,
    format_bytes,
    memory_limit_bytes,
)
from .tt_svd import TTDecomposition, estimate_tt_svd_memory, tt_matrix_svd, tt_matrix_to_tensor
from .tucker import TuckerDecomposition, estimate_tucker_memory, hosvd, tucker, tucker_to_tensor

__all__ = [
    "MEMORY_LIMIT_ENV",
    "TIME_LIMIT_ENV",
    "CPDecomposition",
    "MemoryLimitError",
    "TTDecomposition",
    "TimeLimitError",
    "TuckerDecomposition",
    "available_memory_bytes",
    "check_memory",
    "check_time",
    "cp_als",
    "cp_to_tensor",
    "estimate_cp_als_memory",
    "estimate_cp_als_seconds",
    "estimate_tt_svd_memory",
    "estimate_tucker_memory",
    "format_bytes",
    "hosvd",
    "memory_limit_bytes",
    "tt_matrix_svd",
    "tt_matrix_to_tensor",
    "tucker",
    "tucker_to_tensor",
]
