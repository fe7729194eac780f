"""Inference cache: the rebuilt weight matrix, reused while no parameter has changed.

Used only when autograd is off (``torch.no_grad()`` / ``torch.inference_mode()``) and never
under ``torch.compile``. Validity is checked on every use against a stamp of the parameters:
their identity, storage address, dtype, device and autograd version counter, which every
in-place update bumps (optimizer steps, ``load_state_dict``, ``copy_``, ``mul_``...). ``.to()``
and parameter replacement change the identity or the address, so the cache is never stale.

Two cases need more than the stamp. Under ``torch.autocast`` the matrix is rebuilt in the
autocast dtype, so the autocast state is part of the stamp (a bfloat16 matrix is never served
outside autocast, nor a float32 one inside). And FSDP2 (``fully_shard``) writes every all-gather
into the same unsharded parameter objects with the version counter preserved, into a buffer
the allocator may hand back at the same address: nothing in the stamp would change after an
optimizer step. So while any module of the process is managed by FSDP2 (or another composable
``torch.distributed`` API), :func:`fully_sharded` is True and the layers rebuild instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Optional

import torch

__all__ = ["WeightCache", "fully_sharded"]


def fully_sharded() -> bool:
    """Whether some module of this process is managed by FSDP2 (or another composable
    distributed API, e.g. ``replicate``): FSDP2 rewrites parameters without a version bump
    (module docstring) and hooks its backward onto module outputs, which must not be views.
    A dictionary look-up and a ``len``: cheap enough for every call."""
    composable = sys.modules.get("torch.distributed._composable_state")
    return composable is not None and len(composable._module_state_mapping) > 0


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device_type``, None when autocast is off there."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _stamp(parameters: Sequence[torch.Tensor]) -> tuple:
    # dtype and device once (a parameter moved or cast alone changes its address anyway)
    first = parameters[0]
    return (
        first.dtype,
        first.device,
        _autocast_dtype(first.device.type),
        *[(id(p), p.data_ptr(), p._version) for p in parameters],
    )


class WeightCache:
    """Per-layer-index cache of rebuilt matrices, invalidated by any parameter change."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, torch.Tensor]] = {}

    def get(
        self, key: int, parameters: Sequence[torch.Tensor], build: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The cached value for ``key`` if the parameters are unchanged, else ``build()``."""
        stamp = _stamp(parameters)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        value = build()
        self._entries[key] = (stamp, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
