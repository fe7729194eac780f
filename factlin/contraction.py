"""Contraction plans: an einsum equation whose pairwise order is chosen once and then replayed.

``opt_einsum`` finds the order (the *path*) from the operand shapes; a :class:`ContractionPlan`
stores the resulting sequence of two-operand ``torch.einsum`` calls. Calling the plan only
executes those calls: no parsing beyond torch's own, no path search. A plan depends on shapes
alone, never on dtype or device, so it stays valid across ``.to()``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

import opt_einsum
import torch
from opt_einsum.paths import DynamicProgramming

__all__ = ["ContractionPlan", "plan_contraction", "run_steps", "input_first_path", "EINSUM_LETTERS"]

#: Weight of the largest intermediate's size against FLOPs when comparing paths.
_SIZE_PENALTY = 64

#: The index letters ``torch.einsum`` accepts.
EINSUM_LETTERS = string.ascii_letters


@dataclass(frozen=True)
class ContractionPlan:
    """A fixed sequence of pairwise contractions computing ``equation``.

    Attributes
    ----------
    equation : str
        The full einsum equation, e.g. ``'zab,ar,br->zr'``.
    steps : tuple of (tuple of int, str)
        For each step, the positions of the operands taken from the working list (in the order
        they are taken) and the einsum equation applied to them; the result is appended.
    flops : int
        Floating-point operations of the whole contraction at the planned shapes.
    largest_intermediate : int
        Number of elements of the largest intermediate tensor at the planned shapes.
    """

    equation: str
    steps: tuple[tuple[tuple[int, ...], str], ...]
    flops: int
    largest_intermediate: int

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        """Run the contraction on ``operands`` (same number and order as ``equation``)."""
        return run_steps(self.steps, operands)


def run_steps(
    steps: Sequence[tuple[tuple[int, ...], str]], operands: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Execute a plan's ``steps`` (see :class:`ContractionPlan`) on ``operands``.

    Plain constants in, so ``torch.compile`` traces it without a plan object in the graph.
    """
    working = list(operands)
    for positions, equation in steps:
        taken = [working.pop(position) for position in positions]
        working.append(torch.einsum(equation, *taken))
    return working[0]


def input_first_path(equation: str, shapes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Cheapest path that starts from operand 0 and absorbs one other operand per step.

    Used for the factorized forward: the input (operand 0) is contracted with the factors one
    at a time, so no intermediate is ever built from factors alone and the full weight is never
    formed. The one exception is a vector operand (a CP weight vector, a selected layer's row),
    which is first folded into the smallest factor sharing its index: that costs no more than
    the factor's size and saves a pass over a batch-sized intermediate. The absorption order is
    found by dynamic programming over subsets of operands, minimizing FLOPs plus a penalty on
    the size of every intermediate.
    """
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        sizes.update(zip(term, (int(n) for n in shape)))

    def size_of(term: str) -> int:
        return math.prod(sizes[i] for i in term)

    path: list[tuple[int, ...]] = []
    # Fold vectors into a factor: opt_einsum semantics, both popped and the result appended.
    while True:
        vectors = [k for k in range(1, len(terms)) if len(terms[k]) == 1]
        hosts = {
            v: [k for k in range(1, len(terms)) if k != v and terms[v] in terms[k]] for v in vectors
        }
        vector = next((v for v in vectors if hosts[v]), None)
        if vector is None:
            break
        host = min(hosts[vector], key=lambda k: size_of(terms[k]))
        merged = terms[host]
        path.append(tuple(sorted((vector, host))))
        terms = [t for k, t in enumerate(terms) if k not in (vector, host)] + [merged]

    others = list(range(1, len(terms)))
    full = (1 << len(others)) - 1

    def held_after(absorbed: int) -> frozenset[str]:
        kept, held = set(output), set(terms[0])
        for bit, position in enumerate(others):
            (held if absorbed >> bit & 1 else kept).update(terms[position])
        return frozenset(held & kept)

    held_by = {absorbed: held_after(absorbed) for absorbed in range(full + 1)}
    best: dict[int, tuple[int, list[int]]] = {0: (0, [])}
    for absorbed in range(1, full + 1):
        options = []
        for bit, position in enumerate(others):
            if not absorbed >> bit & 1:
                continue
            previous = absorbed & ~(1 << bit)
            flops = 2 * math.prod(sizes[i] for i in held_by[previous] | set(terms[position]))
            cost = best[previous][0] + flops + _SIZE_PENALTY * size_of("".join(held_by[absorbed]))
            options.append((cost, best[previous][1] + [position]))
        best[absorbed] = min(options)
    # The running intermediate sits at position 0 before the first step and last afterwards.
    remaining = list(range(len(terms)))
    for step, position in enumerate(best[full][1]):
        current = 0 if step == 0 else len(remaining) - 1
        target = remaining.index(position)
        path.append(tuple(sorted((current, target))))
        remaining = [r for k, r in enumerate(remaining) if k not in (current, target)] + [-1]
    return path


def plan_contraction(
    equation: str, shapes: Sequence[Sequence[int]], *, input_first: bool = False
) -> ContractionPlan:
    """Choose the contraction order of ``equation`` for operands of ``shapes``.

    The order minimizes floating-point operations plus a penalty on the size of intermediates
    (opt_einsum's dynamic programming with ``minimize='combo'``), so a cheap path that would
    materialize a huge tensor is avoided.

    Parameters
    ----------
    equation : str
        Einsum equation with an explicit output (``'...->...'``).
    shapes : sequence of tuple of int
        One shape per operand.
    input_first : bool, default False
        Restrict to paths that contract operand 0 with one other operand at a time (see
        :func:`input_first_path`); otherwise any pairwise order is allowed.

    Returns
    -------
    ContractionPlan
    """
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    if len(shapes) == 1:
        return ContractionPlan(equation, (((0,), equation),), 0, 0)
    optimize = (
        input_first_path(equation, shapes) if input_first else DynamicProgramming(minimize="combo")
    )
    _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimize)
    steps = tuple(
        (tuple(positions), step_equation)
        for positions, _, step_equation, _, _ in info.contraction_list
    )
    return ContractionPlan(equation, steps, int(info.opt_cost), int(info.largest_intermediate))
