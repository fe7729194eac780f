"""Choose the tensorized (folded) shape of a linear layer's input and output sizes.

A factorized linear layer with ``in_features`` inputs and ``out_features`` outputs stores its
weight as a tensor whose modes fold each side into a few smaller sizes, for example
``768 -> (8, 8, 12)``.  This module picks those sizes:

* :func:`tensorize_dim` writes one size as the most balanced product of exactly ``order`` factors;
* :func:`get_tensorized_shape` picks a common number of modes for both sides and folds each side.

Everything here is a pure function on Python ints; results are cached, so asking again for a shape
that was already computed costs nothing.
"""

from __future__ import annotations

import bisect
import numbers
from functools import lru_cache
from typing import Iterator

__all__ = ["DEFAULT_ORDER", "get_tensorized_shape", "tensorize_dim"]

#: Number of modes per side used when ``order`` is ``None`` (the default ``n_tensorized_modes``
#: of ``FactorizedLinear.from_linear``).
DEFAULT_ORDER = 3


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_int(name: str, value: object, minimum: int, expected: str = "") -> int:
    """Return ``value`` as a Python int, or raise if it is not an integer ``>= minimum``.

    ``bool`` is rejected; numpy (and other ``numbers.Integral``) integers are accepted and
    converted to a Python ``int``.  ``expected`` overrides the description used in messages.
    """
    expected = expected or f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Number theory helpers
# --------------------------------------------------------------------------------------------
def _prime_factorization(n: int) -> dict[int, int]:
    """Return ``{prime: exponent}`` for ``n >= 1`` (empty for ``n == 1``), by trial division."""
    factors: dict[int, int] = {}
    for p in (2, 3):
        while n % p == 0:
            factors[p] = factors.get(p, 0) + 1
            n //= p
    p, step = 5, 2
    while p * p <= n:
        while n % p == 0:
            factors[p] = factors.get(p, 0) + 1
            n //= p
        p += step
        step = 6 - step  # candidates 5, 7, 11, 13, 17, 19, ... (6k +- 1)
    if n > 1:
        factors[n] = factors.get(n, 0) + 1
    return factors


@lru_cache(maxsize=256)
def _divisors(n: int) -> tuple[int, ...]:
    """Return all divisors of ``n >= 1`` in ascending order."""
    divisors = [1]
    for prime, exponent in _prime_factorization(n).items():
        powers = [prime**e for e in range(1, exponent + 1)]
        divisors = divisors + [d * q for d in divisors for q in powers]
    return tuple(sorted(divisors))


def _max_modes(n: int, min_dim: int) -> int:
    """Upper bound on how many factors ``>= min_dim >= 2`` can multiply to ``n``."""
    count = 0
    power = min_dim
    while power <= n:
        count += 1
        power *= min_dim
    return count


def _power_exceeds(base: int, exponent: int, target: int) -> bool:
    """Return ``base ** exponent > target`` without building huge powers (all arguments >= 0)."""
    if base >= 2 and exponent >= target.bit_length():
        return True  # base ** exponent >= 2 ** bit_length(target) > target
    return base**exponent > target


# --------------------------------------------------------------------------------------------
# Balanced factorization search
# --------------------------------------------------------------------------------------------
def _factorizations(
    rest: int, k: int, lo: int, hi: int, divisors: tuple[int, ...]
) -> Iterator[tuple[int, ...]]:
    """Yield every non-increasing tuple of ``k`` factors in ``[lo, hi]`` whose product is ``rest``.

    ``divisors`` is the ascending divisor list of a multiple of ``rest``.  The largest of ``k``
    factors is at least ``rest ** (1 / k)`` and the others are at least ``lo``, which prunes the
    search to the multiplicative partitions of ``rest`` that can still fit.
    """
    if k == 1:
        if lo <= rest <= hi:
            yield (rest,)
        return
    if rest == 1:  # only possible when lo == 1: pad with ones
        if lo <= 1:
            yield (1,) * k
        return
    start = bisect.bisect_left(divisors, lo)
    stop = bisect.bisect_right(divisors, min(hi, rest))
    for index in range(stop - 1, start - 1, -1):  # largest factor first
        f = divisors[index]
        # f must be the largest of k factors; once it is too small, every smaller f is too.
        if not _power_exceeds(f, k, rest - 1):
            break
        if rest % f:
            continue
        quotient = rest // f
        if _power_exceeds(lo, k - 1, quotient):
            continue
        for tail in _factorizations(quotient, k - 1, lo, f, divisors):
            yield (f, *tail)


def _balance_key(factors: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    """Sort key of a non-increasing factorization: smaller is more balanced."""
    return (factors[0], -factors[-1], factors)


@lru_cache(maxsize=1024)
def _best_factorization(n: int, order: int, min_dim: int) -> tuple[int, ...] | None:
    """Most balanced ascending factorization of ``n`` into ``order`` factors ``>= min_dim``.

    Returns ``None`` when no such factorization exists.  ``order == 1`` always gives ``(n,)``.
    """
    if order == 1:
        return (n,)
    if min_dim >= 2 and order > _max_modes(n, min_dim):
        return None
    divisors = _divisors(n)
    # Candidate largest factors M, in increasing order: the first M that admits a completion
    # with all other factors in [min_dim, M] is the minimal possible largest factor.
    for largest in divisors[bisect.bisect_left(divisors, min_dim) :]:
        if not _power_exceeds(largest, order, n - 1):
            continue
        rest = n // largest
        candidates = [
            (largest, *tail)
            for tail in _factorizations(rest, order - 1, min_dim, largest, divisors)
        ]
        if candidates:
            best = min(candidates, key=_balance_key)
            return tuple(reversed(best))
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def tensorize_dim(n: int, order: int, min_dim: int = 2) -> tuple[int, ...]:
    """Write ``n`` as the most balanced product of exactly ``order`` factors ``>= min_dim``.

    Parameters
    ----------
    n : int
        The size to fold, ``>= 1``.
    order : int
        Number of factors, ``>= 1``.  ``order == 1`` always returns ``(n,)`` whatever ``min_dim``.
    min_dim : int, default 2
        Smallest allowed factor, ``>= 1``.  ``min_dim=1`` allows factors of size 1, so that any
        ``n`` can be written with any ``order`` (padding with ones when needed).

    Returns
    -------
    tuple of int
        ``order`` Python ints in ascending order whose product is ``n``.  Among all ways of
        writing ``n`` as ``order`` factors ``>= min_dim`` this is the one that

        1. minimizes the largest factor, then
        2. maximizes the smallest factor, then
        3. is smallest when compared from the largest factor down (lexicographic order of the
           factors sorted in decreasing order), which makes the choice unique.

    Raises
    ------
    TypeError
        If an argument is not an int (``bool`` is rejected; numpy integers are accepted).
    ValueError
        If ``n < 1``, ``order < 1``, ``min_dim < 1``, or ``n`` cannot be written as ``order``
        factors ``>= min_dim`` (for instance a prime ``n`` with ``order >= 2``).

    Examples
    --------
    >>> tensorize_dim(768, 3)
    (8, 8, 12)
    >>> tensorize_dim(3072, 3)
    (12, 16, 16)
    >>> tensorize_dim(1024, 3)
    (8, 8, 16)
    >>> tensorize_dim(7, 3, min_dim=1)
    (1, 1, 7)
    """
    n = _check_int("n", n, 1)
    order = _check_int("order", order, 1)
    min_dim = _check_int("min_dim", min_dim, 1)
    factors = _best_factorization(n, order, min_dim)
    if factors is None:
        raise ValueError(
            f"n={n} cannot be written as a product of order={order} factors each >= "
            f"min_dim={min_dim}; use a smaller order or min_dim"
        )
    return factors


def get_tensorized_shape(
    in_features: int,
    out_features: int,
    order: int | None = None,
    min_dim: int = 2,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Fold the input and output sizes of a linear layer into the same number of modes.

    Parameters
    ----------
    in_features : int
        Input size of the linear layer, ``>= 1``.
    out_features : int
        Output size of the linear layer, ``>= 1``.
    order : int or None, default None
        Wanted number of modes ``d`` on each side, ``>= 1``.  ``None`` means ``3``
        (:data:`DEFAULT_ORDER`, the default ``n_tensorized_modes`` of ``from_linear``).
    min_dim : int, default 2
        Smallest allowed mode size when ``d > 1``, ``>= 1``.

    Returns
    -------
    in_tensorized_features, out_tensorized_features : tuple of int
        Two tuples of the same length ``d`` whose products are ``in_features`` and
        ``out_features``.  Each is sorted ascending and holds Python ints.

    Raises
    ------
    TypeError
        If an argument is not an int (``order`` may also be ``None``); ``bool`` is rejected and
        numpy integers are accepted.
    ValueError
        If ``in_features < 1``, ``out_features < 1``, ``order < 1`` or ``min_dim < 1``.

    Notes
    -----
    **Number of modes.**  Both sides always get the same number of modes ``d`` (the weight tensor
    pairs input and output modes).  ``d`` is the largest integer ``<= order`` such that *both*
    sizes can be written as a product of ``d`` factors, each ``>= min_dim``.  Being able to do so
    is monotone in ``d`` (merging two factors ``>= min_dim`` keeps them ``>= min_dim``), so this
    is ``order`` whenever possible and otherwise the most modes both sides allow.  If not even
    ``d = 2`` works (for example a prime size, or a size of 1), ``d = 1`` and the result is
    ``((in_features,), (out_features,))``, whatever ``min_dim``.

    **No modes of size 1 by default.**  A side is *not* padded with modes of size 1 so that the
    other side can keep more modes: with ``in_features = 7`` (prime) and ``out_features = 768``
    the result is ``((7,), (768,))``, not ``((1, 1, 7), (8, 8, 12))``.  A mode of size 1 carries
    no structure: in CP and Tucker it adds a ``1 x rank`` factor that is pure overhead (and pins
    that Tucker rank to 1), and in a tensor-train matrix its core only reshapes the other side.
    Keeping every mode ``>= min_dim`` keeps the layer's decomposition well posed.  Callers who
    want the padded shape can opt in explicitly with ``min_dim=1``, which allows modes of size 1
    and therefore always gives ``d = order``.

    **Mode sizes.**  Each side is then folded with :func:`tensorize_dim`: among all ways of
    writing the size as ``d`` factors ``>= min_dim``, the most balanced one (smallest largest
    factor, then largest smallest factor, then a fixed deterministic order), sorted ascending.
    The search enumerates multiplicative partitions of the size's divisors with pruning, which is
    fast for sizes up to ``10**7`` and beyond and orders up to 8 and beyond.

    **Differences from tltorch.**  ``tltorch.utils.get_tensorized_shape`` splits each size
    greedily into its smallest divisors and then repeatedly multiplies the two smallest factors
    together until ``d`` remain.  That tends to leave one large factor: ``768 -> (4, 12, 16)``
    and ``1000 -> (5, 8, 25)`` where this function gives ``(8, 8, 12)`` and ``(10, 10, 10)``.
    Its output side is also only split into as many pieces as the input side has prime factors
    plus one, so the result depends on the argument order (``(3072, 768)`` and ``(768, 3072)``
    fold 768 and 3072 differently).  With ``order=None`` tltorch uses *every* prime factor
    (e.g. ``768 -> (2, 2, 2, 2, 2, 2, 2, 2, 3)``), whereas here ``None`` means 3 modes.  It also
    prints a line by default (``verbose=True``); this function never prints.  Both agree that a
    prime size on either side gives ``d = 1``.

    Examples
    --------
    >>> get_tensorized_shape(768, 3072)
    ((8, 8, 12), (12, 16, 16))
    >>> get_tensorized_shape(1000, 4096, order=3)
    ((10, 10, 10), (16, 16, 16))
    >>> get_tensorized_shape(768, 768, order=2)
    ((24, 32), (24, 32))
    >>> get_tensorized_shape(7, 768)
    ((7,), (768,))
    >>> get_tensorized_shape(7, 768, min_dim=1)
    ((1, 1, 7), (8, 8, 12))
    >>> get_tensorized_shape(12, 12, order=3, min_dim=3)
    ((3, 4), (3, 4))
    """
    in_features = _check_int("in_features", in_features, 1)
    out_features = _check_int("out_features", out_features, 1)
    if order is None:
        order = DEFAULT_ORDER
    else:
        order = _check_int("order", order, 1, expected="None or an int >= 1")
    min_dim = _check_int("min_dim", min_dim, 1)

    if min_dim >= 2:
        order = min(order, _max_modes(in_features, min_dim), _max_modes(out_features, min_dim))
    for d in range(order, 1, -1):
        in_shape = _best_factorization(in_features, d, min_dim)
        if in_shape is None:
            continue
        out_shape = _best_factorization(out_features, d, min_dim)
        if out_shape is not None:
            return in_shape, out_shape
    return (in_features,), (out_features,)
