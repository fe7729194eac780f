"""Inference cache: the rebuilt weight matrix, reused while no parameter has changed.

Used only when autograd is off (``torch.no_grad()`` / ``torch.inference_mode()``) and never
under ``torch.compile``. Validity is checked on every use against a stamp of the parameters:
their identity, storage address, dtype, device and autograd version counter, which every
in-place update bumps (optimizer steps, ``load_state_dict``, ``copy_``, ``mul_``...). ``.to()``
and parameter replacement change the identity or the address, so the cache is never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["WeightCache"]


def _stamp(parameters: Sequence[torch.Tensor]) -> tuple:
    # dtype and device once (a parameter moved or cast alone changes its address anyway)
    first = parameters[0]
    return (first.dtype, first.device, *[(id(p), p.data_ptr(), p._version) for p in parameters])


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
