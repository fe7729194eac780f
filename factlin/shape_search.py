"""Tensorized shapes chosen by fit: try a few foldings of a weight, keep the one that fits best.

:func:`factlin.get_tensorized_shape` folds each side of a linear layer into its most balanced
factors (``384 -> (6, 8, 8)``). That is a fine default for a layer built from scratch, but when a
trained weight is compressed the folding changes the error a given budget buys: tltorch's more
lopsided ``384 -> (4, 6, 16)``, ``1536 -> (6, 16, 16)`` fit the MiniLM weights better in TT and
Tucker at the same parameter count. This module searches a small set of foldings:

* :func:`candidate_shapes` lists at most ``max_candidates`` ``(in_shape, out_shape)`` pairs: the
  balanced one first, then pairs of foldings of each side from balanced to very lopsided (e.g.
  ``384 -> (6, 8, 8), (4, 6, 16), (2, 4, 48), (2, 2, 96)``), the most lopsided first; for TT
  (whose cores pair ``in[k]`` with ``out[k]``) with the output modes in decreasing order
  first. On the MiniLM weights the balanced folding is among the *worst* for TT and Tucker at
  equal budget (e.g. 262nd of 288 foldings for TT at 0.25 on a 384x384 weight): a
  large mode lets the ranks capture the weight's leading singular structure;
* :func:`choose_tensorized_shape` fits each candidate at the *same budget*: the parameter count
  the rank spec gives on the balanced shape; the other candidates get the largest rank whose
  parameter count does not exceed it, so no candidate wins by spending more. The lowest error
  wins; the balanced shape is a candidate, so the result is never worse than it.

The error is the data-free decomposition's relative weight error by default (the decomposition
``FactorizedLinear.from_linear`` runs), or any ``error_fn(in_shape, out_shape, rank) ->
(error, params)`` (e.g. a calibrated output error).

**CP** fits cost seconds to minutes each at useful ranks, too much to run per candidate. By
default (``cp_proxy='sweeps'``) CP candidates are ranked by CP-ALS limited to 3 sweeps, then
the proxy's pick and the balanced shape are fitted in full and the better one is kept, so the
result is never worse than the balanced shape; see :data:`CP_PROXIES` and
``benchmarks/README.md`` for how well the proxies rank candidates like the real CP fit on the
MiniLM weights.

Everything here is a pure function: it reads the weight and returns shapes and a report.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Optional

import torch

from ._typing import RankSpec, Shape
from .errors import ShapeError, describe
from .tensorized_shape import _divisors, get_tensorized_shape

__all__ = ["CP_PROXIES", "DEFAULT_MAX_CANDIDATES", "candidate_shapes", "choose_tensorized_shape"]

#: Default bound on the number of candidates fitted per layer.
DEFAULT_MAX_CANDIDATES = 12

#: Factorizations of each side kept before pairing (the most balanced ones).
_PER_SIDE = 4

#: How CP candidates are ranked: ``'sweeps'`` (default) CP-ALS limited to
#: :data:`CP_PROXY_SWEEPS` sweeps, then the proxy's pick and the balanced shape are fitted in
#: full and the better kept; ``'full'`` the real CP fit of every candidate (expensive);
#: ``'balanced'`` no search. Measured on MiniLM weights at rank 0.1 (benchmarks/README.md): the
#: 3-sweep errors rank the candidates like the full fits (Spearman 0.87-0.92), while the Tucker
#: error at the same budget does not (-0.20-0.18: it prefers shapes where CP is worse).
CP_PROXIES = ("sweeps", "full", "balanced")

#: Sweeps of the ``'sweeps'`` CP proxy.
CP_PROXY_SWEEPS = 3

ErrorFn = Callable[[Shape, Shape, Any], tuple[float, int]]


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------
def _factorizations(n: int, order: int, min_dim: int) -> list[tuple[int, ...]]:
    """Every ascending tuple of ``order`` factors ``>= min_dim`` whose product is ``n``."""
    divisors = [d for d in _divisors(n) if d >= min_dim]

    def build(rest: int, k: int, lo: int) -> list[tuple[int, ...]]:
        if k == 1:
            return [(rest,)] if rest >= lo else []
        out = []
        for d in divisors:
            if d < lo:
                continue
            if d**k > rest:
                break
            if rest % d == 0:
                out.extend((d, *tail) for tail in build(rest // d, k - 1, d))
        return out

    return build(n, order, min_dim)


def _side_options(n: int, order: int, min_dim: int, balanced: Shape) -> list[Shape]:
    """Up to :data:`_PER_SIDE` foldings of one side, from balanced to most lopsided.

    One representative per largest factor (the most balanced remainder), then the balanced
    one, two spread between, and the most lopsided: lopsided foldings (a large mode) fit
    trained weights better in TT and Tucker at equal budget (module notes).
    """
    by_largest: dict[int, tuple[int, ...]] = {}
    for f in sorted(_factorizations(n, order, min_dim), key=lambda f: (f[-1], -f[0], f)):
        by_largest.setdefault(f[-1], f)
    levels = [tuple(balanced)] + [f for f in by_largest.values() if f != tuple(balanced)]
    if len(levels) <= _PER_SIDE:
        return levels
    last = len(levels) - 1
    picks = sorted({round(k * last / (_PER_SIDE - 1)) for k in range(_PER_SIDE)})
    return [levels[k] for k in picks]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={describe(value)}: expected an int >= {minimum}")
    if value < minimum:
        raise ShapeError(f"{name}={value}: expected an int >= {minimum}")
    return int(value)


def candidate_shapes(
    in_features: int,
    out_features: int,
    n_modes: int = 3,
    *,
    factorization: str = "tucker",
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    min_dim: int = 2,
) -> list[tuple[Shape, Shape]]:
    """Candidate ``(in_shape, out_shape)`` foldings of a layer, the balanced one first.

    Parameters
    ----------
    in_features, out_features : int
        The layer's sizes.
    n_modes : int, default 3
        Modes per side (fewer when the sizes do not allow it, as in
        :func:`~factlin.get_tensorized_shape`).
    factorization : str, default 'tucker'
        ``'tt'`` tries the pairs with the output modes in decreasing order first, then in
        increasing order (a TT-matrix core pairs ``in[k]`` with ``out[k]``; CP and Tucker do
        not depend on the order of the modes).
    max_candidates : int, default 12
        At most this many candidates.
    min_dim : int, default 2
        Smallest mode size.

    Returns
    -------
    list of (tuple of int, tuple of int)
        Distinct candidates; the first is ``get_tensorized_shape(in, out, n_modes, min_dim)``.
        Then pairs of up to 4 foldings of each side, from balanced to most lopsided (one per
        largest factor: the balanced one, two spread between, the most lopsided), the most
        lopsided pairs first.

    Examples
    --------
    >>> candidate_shapes(384, 1536, 3, max_candidates=3)
    [((6, 8, 8), (8, 12, 16)), ((2, 2, 96), (2, 2, 384)), ((2, 4, 48), (2, 2, 384))]
    """
    from .factorizations import normalize_factorization

    in_features = _check_int("in_features", in_features, 1)
    out_features = _check_int("out_features", out_features, 1)
    n_modes = _check_int("n_modes", n_modes, 1)
    max_candidates = _check_int("max_candidates", max_candidates, 1)
    min_dim = _check_int("min_dim", min_dim, 1)
    name = normalize_factorization(factorization)
    in_bal, out_bal = get_tensorized_shape(in_features, out_features, n_modes, min_dim)
    order = len(in_bal)
    if order == 1:
        return [(in_bal, out_bal)]
    ins = _side_options(in_features, order, min_dim, in_bal)
    outs = _side_options(out_features, order, min_dim, out_bal)
    # most lopsided pairs first (the balanced pair always leads): the level of the more
    # lopsided side, then of the other
    pairs = sorted(
        ((a, b) for a in range(len(ins)) for b in range(len(outs))),
        key=lambda ab: (ab != (0, 0), -max(ab), -min(ab), ab),
    )
    out: list[tuple[Shape, Shape]] = [(in_bal, out_bal)]
    if name == "tt":
        # TT: the output modes reversed first (the large input mode then meets a small output
        # mode in the same core): 35 and 36 of the 36 MiniLM weights chose such a variant at
        # ranks 0.25 and 0.43); the same orders as the other formats if room is left
        orders = [(ins[a], outs[b][::-1]) for a, b in pairs] + [(ins[a], outs[b]) for a, b in pairs]
    else:
        orders = [(ins[a], outs[b]) for a, b in pairs]
    for variant in orders:
        if variant not in out:
            out.append(variant)
    return out[:max_candidates]


# --------------------------------------------------------------------------------------------
# Budget matching
# --------------------------------------------------------------------------------------------
def _resolve(factorization: str, rank: RankSpec, in_shape: Shape, out_shape: Shape):
    from .factorizations import resolve_rank

    return resolve_rank(factorization, rank, in_shape, out_shape)


def _rank_within(
    factorization: str, budget: int, in_shape: Shape, out_shape: Shape
) -> tuple[Any, int]:
    """The largest fraction's ranks whose parameter count is at most ``budget`` (bisection)."""
    dense = math.prod(in_shape) * math.prod(out_shape)
    lo, hi = 0.0, budget / dense
    ranks, params = _resolve(factorization, hi, in_shape, out_shape)
    if params <= budget:
        return ranks, params
    best: Optional[tuple[Any, int]] = None
    for _ in range(30):
        mid = (lo + hi) / 2
        if mid <= 0:
            break
        ranks, params = _resolve(factorization, mid, in_shape, out_shape)
        if params <= budget:
            lo, best = mid, (ranks, params)
        else:
            hi = mid
        if hi - lo < 1e-4 * hi:
            break
    if best is None:  # even the smallest ranks exceed the budget: the smallest there is
        best = _resolve(factorization, 1, in_shape, out_shape)
    return best


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _decomposition_error(
    weight_2d: torch.Tensor,
    factorization: str,
    in_shape: Shape,
    out_shape: Shape,
    rank: Any,
    decomposition_kwargs: dict,
) -> tuple[float, int]:
    """Relative weight error of the data-free decomposition ``from_linear`` would run."""
    from .factorizations import get_factorization

    weight_class = get_factorization(factorization)
    fitted = weight_class(
        tuple(in_shape), tuple(out_shape), rank, device=weight_2d.device, dtype=weight_2d.dtype
    )
    tensor = weight_2d.detach().reshape(*out_shape, *in_shape)
    info = fitted.init_from_tensor(tensor, **decomposition_kwargs)
    return float(info["rel_error"]), int(fitted.num_parameters())


def choose_tensorized_shape(
    weight_2d: torch.Tensor,
    factorization: str,
    rank: RankSpec,
    n_modes: int = 3,
    *,
    error_fn: Optional[ErrorFn] = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    min_dim: int = 2,
    cp_proxy: str = "sweeps",
    decomposition_kwargs: Optional[dict] = None,
) -> tuple[Shape, Shape, list[dict]]:
    """Choose the folding of a weight matrix that fits best at the budget of ``rank``.

    Parameters
    ----------
    weight_2d : Tensor
        The ``(out_features, in_features)`` weight of a linear layer.
    factorization : str
        ``'cp'``, ``'tucker'`` or ``'tt'`` (any accepted alias).
    rank : 'same', float, int or tuple of int
        As for ``FactorizedLinear``. It sets the budget: its parameter count on the balanced
        shape (:func:`~factlin.get_tensorized_shape`). The balanced shape is fitted with
        ``rank`` itself, every other candidate with the largest ranks (a fraction found by
        bisection) that do not exceed that budget.
    n_modes : int, default 3
        Modes per side.
    error_fn : callable, optional
        ``error_fn(in_shape, out_shape, rank) -> (error, params)``, called once per candidate
        with its resolved ranks; lower is better. Default: the relative weight error of the
        decomposition ``FactorizedLinear.from_linear`` runs (for CP, see ``cp_proxy``).
    max_candidates : int, default 12
        Bound on the candidates fitted (:func:`candidate_shapes`).
    min_dim : int, default 2
        Smallest mode size.
    cp_proxy : {'sweeps', 'full', 'balanced'}, default 'sweeps'
        How CP candidates are ranked when ``error_fn`` is None (:data:`CP_PROXIES`): by CP-ALS
        limited to 3 sweeps, the proxy's pick then checked against the balanced shape by full
        fits; by the full CP fit of every candidate; or not at all (the balanced shape).
    decomposition_kwargs : dict, optional
        Passed to the decompositions of the default error (e.g. ``random_state``).

    Returns
    -------
    in_shape, out_shape : tuple of int
        The chosen folding (Python ints).
    info : list of dict
        One entry per candidate, in the order tried: ``in_shape``, ``out_shape``, ``rank``
        (resolved for that shape), ``params``, ``error`` and ``chosen`` (True for one entry);
        with a CP proxy, ``error`` is the proxy's and ``proxy`` names it, and the entries
        fitted in full also carry ``full_error`` (the choice is made on it).

    Raises
    ------
    TypeError, ValueError
        A weight that is not a 2-D floating-point tensor, a bad factorization, rank, option or
        ``error_fn`` result.

    Notes
    -----
    Cost: one decomposition per candidate (at most ``max_candidates``) on top of the final fit;
    Tucker and TT take milliseconds to a second per candidate on MiniLM-sized layers. Ties keep
    the earlier candidate, so the balanced shape wins unless another one is strictly better.

    Examples
    --------
    >>> w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    >>> in_shape, out_shape, info = choose_tensorized_shape(w, "tt", 0.3, 2)
    >>> math.prod(in_shape), math.prod(out_shape), sum(c["chosen"] for c in info)
    (96, 64, 1)
    """
    from .factorizations import normalize_factorization

    if not isinstance(weight_2d, torch.Tensor):
        raise TypeError(f"weight_2d={describe(weight_2d)}: expected a 2-D torch.Tensor")
    if weight_2d.ndim != 2 or not weight_2d.is_floating_point():
        raise ShapeError(
            f"weight_2d has shape {tuple(weight_2d.shape)} and dtype {weight_2d.dtype}: "
            "expected a 2-D floating-point (out_features, in_features) weight"
        )
    name = normalize_factorization(factorization)
    if error_fn is not None and not callable(error_fn):
        raise TypeError(
            f"error_fn={describe(error_fn)}: expected a callable "
            "(in_shape, out_shape, rank) -> (error, params)"
        )
    if not isinstance(cp_proxy, str) or cp_proxy not in CP_PROXIES:
        raise ShapeError(f"cp_proxy={cp_proxy!r}: expected one of {CP_PROXIES}")
    if decomposition_kwargs is not None and not isinstance(decomposition_kwargs, dict):
        raise TypeError(
            f"decomposition_kwargs={describe(decomposition_kwargs)}: expected a dict or None"
        )
    kwargs = dict(decomposition_kwargs or {})
    out_features, in_features = (int(n) for n in weight_2d.shape)
    candidates = candidate_shapes(
        in_features,
        out_features,
        n_modes,
        factorization=name,
        max_candidates=max_candidates,
        min_dim=min_dim,
    )
    if name == "cp" and error_fn is None and cp_proxy == "balanced":
        candidates = candidates[:1]
    balanced_rank, budget = _resolve(name, rank, *candidates[0])

    measure, proxy = _error_function(weight_2d, name, error_fn, cp_proxy, kwargs)
    info: list[dict] = []
    for index, (in_shape, out_shape) in enumerate(candidates):
        if index == 0:
            ranks, params = balanced_rank, budget
        else:
            ranks, params = _rank_within(name, budget, in_shape, out_shape)
        error, reported = measure(in_shape, out_shape, ranks, params)
        entry = {
            "in_shape": tuple(in_shape),
            "out_shape": tuple(out_shape),
            "rank": ranks,
            "params": int(reported),
            "error": float(error),
            "chosen": False,
        }
        if proxy is not None:
            entry["proxy"] = proxy
        info.append(entry)
    best = min(range(len(info)), key=lambda k: (info[k]["error"], k))
    if name == "cp" and error_fn is None and cp_proxy == "sweeps" and best != 0:
        # the proxy's pick against the balanced shape, by full fits: never worse than balanced
        for k in (0, best):
            entry = info[k]
            entry["full_error"], _ = _decomposition_error(
                weight_2d, "cp", entry["in_shape"], entry["out_shape"], entry["rank"], kwargs
            )
        best = min((0, best), key=lambda k: (info[k]["full_error"], k))
    info[best]["chosen"] = True
    return info[best]["in_shape"], info[best]["out_shape"], info


def _error_function(
    weight_2d: torch.Tensor,
    name: str,
    error_fn: Optional[ErrorFn],
    cp_proxy: str,
    kwargs: dict,
) -> tuple[Callable[[Shape, Shape, Any, int], tuple[float, int]], Optional[str]]:
    """``measure(in_shape, out_shape, ranks, params) -> (error, params)`` and the proxy name."""
    if error_fn is not None:

        def measure_user(in_shape, out_shape, ranks, params):
            result = error_fn(tuple(in_shape), tuple(out_shape), ranks)
            if (
                not isinstance(result, tuple)
                or len(result) != 2
                or not isinstance(result[0], numbers.Real)
                or not math.isfinite(float(result[0]))
            ):
                raise TypeError(
                    f"error_fn{(tuple(in_shape), tuple(out_shape), ranks)} returned "
                    f"{describe(result)}: expected a tuple (error, params) with a finite error"
                )
            return float(result[0]), int(result[1])

        return measure_user, None
    if name != "cp" or cp_proxy == "full":

        def measure_own(in_shape, out_shape, ranks, params):
            return _decomposition_error(weight_2d, name, in_shape, out_shape, ranks, kwargs)

        return measure_own, None
    if cp_proxy == "sweeps":
        cp_kwargs = {**kwargs, "n_iter_max": CP_PROXY_SWEEPS, "tol": 0.0}

        def measure_sweeps(in_shape, out_shape, ranks, params):
            return _decomposition_error(weight_2d, "cp", in_shape, out_shape, ranks, cp_kwargs)

        return measure_sweeps, f"cp_als, {CP_PROXY_SWEEPS} sweeps"
    return (lambda in_shape, out_shape, ranks, params: (0.0, params)), "balanced"
