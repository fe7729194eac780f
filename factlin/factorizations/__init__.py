"""Factorized weight formats and their registry.

Adding a format means one module defining a :class:`FactorizedWeight` subclass and one entry in
:data:`FACTORIZATIONS`.
"""

from __future__ import annotations

from typing import Any

from .._typing import RankSpec, Shape
from ..errors import FactlinError, describe
from ._base import FactorizedWeight
from .cp import CPWeight
from .tt import TTWeight
from .tucker import TuckerWeight

__all__ = [
    "FACTORIZATIONS",
    "ALIASES",
    "FactorizedWeight",
    "CPWeight",
    "TuckerWeight",
    "TTWeight",
    "get_factorization",
    "normalize_factorization",
    "resolve_rank",
]

#: Canonical (lower-case) names to weight classes.
FACTORIZATIONS: dict[str, type[FactorizedWeight]] = {
    "cp": CPWeight,
    "tucker": TuckerWeight,
    "tt": TTWeight,
}

#: Other accepted names (lower-case), e.g. tltorch's, mapped to canonical ones.
ALIASES: dict[str, str] = {"blocktt": "tt", "ttm": "tt", "tt-matrix": "tt", "parafac": "cp"}


def normalize_factorization(name: object) -> str:
    """Canonical name of a factorization given in any case or by an alias.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If it is not a known name; the message lists the valid ones.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"factorization={describe(name)}: expected a string, one of "
            f"{sorted(FACTORIZATIONS)} (aliases {sorted(ALIASES)})"
        )
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FACTORIZATIONS:
        raise FactlinError(
            f"factorization={name!r} is not known; expected one of {sorted(FACTORIZATIONS)} "
            f"(case-insensitive; aliases {sorted(ALIASES)})"
        )
    return key


def get_factorization(name: object) -> type[FactorizedWeight]:
    """The weight class registered under ``name`` (case-insensitive, aliases accepted)."""
    return FACTORIZATIONS[normalize_factorization(name)]


def resolve_rank(
    factorization: str, rank: RankSpec, in_shape: Shape, out_shape: Shape, n_layers: int = 1
) -> tuple[Any, int]:
    """Resolved ranks and parameter count of a weight, without allocating it.

    Examples
    --------
    >>> resolve_rank("tucker", 0.1, (8, 8, 12), (8, 8, 12))
    ((6, 6, 8, 5, 5, 8), 57968)
    """
    weight_class = get_factorization(factorization)
    weight = weight_class(tuple(in_shape), tuple(out_shape), rank, n_layers, device="meta")
    return weight.rank, weight.num_parameters()
