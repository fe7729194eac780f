"""Type aliases shared across factlin."""

from __future__ import annotations

from typing import Union

#: What a user may pass as ``rank``: ``'same'``, a fraction of the dense parameter count,
#: one integer rank, or one rank per mode / per bond.
RankSpec = Union[str, float, int, tuple[int, ...], list[int]]

#: A tensorized shape: the sizes of the modes one feature dimension is split into.
Shape = tuple[int, ...]
