"""Contraction plans: a pairwise contraction order chosen once, compiled to matmuls, replayed.

Planning picks the order in which the operands of an einsum equation are contracted two at a
time. Candidate orders come from an exhaustive search over operand subsets (small networks),
from opt_einsum's searches (dynamic programming; random-greedy for larger networks) and from a
greedy pass; the winner is the fastest under a small time model of the CPU kernels involved
(:func:`step_seconds`): FLOPs at a rate that drops for skinny and for narrow matrix products
(see :mod:`factlin._matmul`), memory traffic, permutation copies, a cost per matrix of a
batched product, the page faults of buffers too large for the allocator to keep
(:func:`fresh_seconds`) and a fixed cost per step; for a plan that will be differentiated
(training), each step's backward too. The searches price candidate steps without building them,
and are deterministic: the same shapes give the same plan in every process. Each pairwise step
is then *compiled* to plain tensor operations (a permutation, a reshape, one ``matmul``, a
broadcast product when nothing is summed, or a product and a sum for a batch of dot products),
with the layout of every intermediate chosen so that most permutations are free views. Calling
a plan only executes those operations, as straight-line Python generated once per batch size
(:func:`compile_runner`): no parsing, no path search, no ``torch.einsum`` dispatch, no loop
interpreting the steps.

A plan depends on shapes alone, never on dtype or device, so it stays valid across ``.to()``. Its
steps are plain tuples of ints, so ``torch.compile`` and ``torch.export`` trace them as constants.
One operand mode may be marked as the *batch* mode: its size is then left free (``-1``) in every
reshape, so one plan serves every batch size of its bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import opt_einsum
import torch
from opt_einsum.paths import DynamicProgramming, branch

from ._matmul import backward_is_narrow, narrow_penalty, oriented_matmul

__all__ = [
    "ContractionPlan",
    "plan_contraction",
    "run_steps",
    "step_seconds",
    "matmul_seconds",
    "EINSUM_LETTERS",
]

#: The index letters usable in equations (those ``torch.einsum`` accepts).
EINSUM_LETTERS = string.ascii_letters

# ---- the time model ----------------------------------------------------------------------
# Fitted on this project's CPUs (one thread, float32) over 160 random batched matrix products,
# 30% of them with 2-15 result columns (the slow "narrow" case of :mod:`factlin._matmul`, charged
# 3x); 76% within a factor of 2 (the model before the narrow case was separated: 72%). Only
# ratios between candidate plans matter.
#: Peak matmul rate (FLOP/s).
PEAK_FLOPS = 8.6e10
#: Half-efficiency sizes of the three matmul dimensions (rows, columns, summed).
_HALF_M, _HALF_N, _HALF_K = 0.6, 9.3, 6.0
#: Seconds per element read or written by a kernel.
SECONDS_PER_ELEMENT = 2.1e-10
#: Seconds per matrix element of a single matrix-vector product (measured: 768x768 to 3072x768
#: at batch 1, 0.09-0.15 ns per element alone; 2048x2048 and larger, or 768x3072 amid a model's
#: other traffic, 0.18-0.23 ns: past the caches)...
SECONDS_PER_GEMV_ELEMENT = 1e-10
#: ...for matrices up to this many elements (4 MiB in float32); twice that beyond.
_GEMV_CACHED_ELEMENTS = 1 << 20
#: Seconds per element of a broadcast product (memory bound).
SECONDS_PER_PRODUCT_ELEMENT = 7e-10
#: Seconds per element copied by a permuting ``reshape``.
SECONDS_PER_COPIED_ELEMENT = 1.5e-9
#: Extra factor for a permuting copy whose innermost mode changes (strided reads or writes).
_GATHER_PENALTY = 3.0
#: Extra seconds per matrix of a batched product (the kernel loops over them: measured 0.2-1.7
#: us each for 2x2 to 32x32 matrices, beyond what their FLOPs explain).
SECONDS_PER_BATCHED_MATRIX = 2e-7
#: Fixed cost of one step (its few kernel launches plus the Python around them).
SECONDS_PER_STEP = 2e-5
#: Seconds per element of a buffer too large for the C allocator to keep between calls (above
#: glibc's largest mmap threshold, 32 MiB): each call maps it afresh and pays its page faults.
#: Measured, float32 elementwise product: 2.5-2.8 ns per element from 48 MiB up (5-6x the
#: product's own time), nothing up to 32 MiB.
SECONDS_PER_FRESH_ELEMENT = 2.6e-9
#: ...for buffers above this many elements (32 MiB of float32).
_FRESH_ELEMENTS = 8 << 20
#: Largest operand count searched exhaustively by :func:`_search_exhaustive` (3**n splits).
_MAX_EXHAUSTIVE = 9
#: Largest operand count also given to opt_einsum's dynamic programming (a few ms; fully
#: connected networks, CP's, make it explode beyond: 27 ms at 8 operands, 2 s at 12).
_MAX_DYNAMIC_PROGRAMMING = 6
#: Result orders the exhaustive search keeps per subset of operands (see there)...
_ORDERS_KEPT = 2
#: ...up to this many operands (one beyond)...
_MAX_EXHAUSTIVE_ORDERS = 8
#: ...within this factor of the cheapest.
_ORDER_MARGIN = 1.1
#: Batch sizes whose resolved reshape targets a plan keeps (then it starts over).
_MAX_SIZED_BATCHES = 64
#: Trials of opt_einsum's random-greedy search for larger networks (seeded, so deterministic):
#: at most this many...
_RANDOM_GREEDY_REPEATS = 32
#: ...at least this many...
_MIN_RANDOM_GREEDY_REPEATS = 4
#: ...and about this many operand pairs in all (a trial weighs about n**2 pairs: 16 trials at
#: 20 operands, a few ms each).
_RANDOM_GREEDY_BUDGET = 6400


def matmul_seconds(batch: int, m: int, n: int, k: int) -> float:
    """Model time of ``batch`` products of ``(m, k) @ (k, n)`` matrices."""
    elements = batch * (m * n + m * k + k * n)
    if batch == 1 and min(m, n) == 1 and k > 1:
        # one matrix-vector product: a streaming kernel, bound by reading the matrix
        per_element = SECONDS_PER_GEMV_ELEMENT * (1 if m * n * k <= _GEMV_CACHED_ELEMENTS else 2)
        return per_element * elements + SECONDS_PER_STEP
    efficiency = (m / (m + _HALF_M)) * (n / (n + _HALF_N)) * (k / (k + _HALF_K))
    efficiency /= narrow_penalty(m, n)
    flops = 2.0 * batch * m * n * k
    overhead = SECONDS_PER_STEP + (SECONDS_PER_BATCHED_MATRIX * batch if batch > 1 else 0.0)
    return flops / (PEAK_FLOPS * efficiency) + SECONDS_PER_ELEMENT * elements + overhead


# ---- plans -------------------------------------------------------------------------------
#: One compiled step: positions of the left and right operands in the working list, dims to sum
#: out of each first, the permutation and 3-d shape each is brought to, whether the step is a
#: broadcast product (nothing summed) rather than a matmul, the result's shape, and the
#: product's (m, k, n).
Step = tuple[
    int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...],
    tuple[int, ...], tuple[int, ...], bool, tuple[int, ...], tuple[int, int, int],
]  # fmt: skip


@dataclass(frozen=True)
class ContractionPlan:
    """A fixed sequence of compiled pairwise contractions computing ``equation``.

    Attributes
    ----------
    equation : str
        The full einsum equation, e.g. ``'zab,ar,br->zr'``.
    path : tuple of (int, int)
        The pairwise order: positions in the working list of the two operands of each step
        (the result is appended to the list).
    steps : tuple
        The compiled steps (see :data:`Step`), then the final permutation to the output order.
    flops : int
        Floating-point operations of the whole contraction at the planned shapes.
    largest_intermediate : int
        Number of elements of the largest intermediate tensor at the planned shapes.
    seconds : float
        Modelled time of one call at the planned shapes on a CPU (see :func:`step_seconds`).
    elements_written : int
        Total number of elements of all intermediates and the result (memory traffic).
    """

    equation: str
    path: tuple[tuple[int, int], ...]
    steps: tuple
    flops: int
    largest_intermediate: int
    seconds: float
    elements_written: int = 0
    #: Straight-line runners per batch size seen (eager calls; see :func:`compile_runner`).
    _runners: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_steps(self) -> int:
        """Number of pairwise contractions (each a few kernel launches)."""
        return len(self.path)

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        """Run the contraction on ``operands`` (same number and order as ``equation``)."""
        batch_at = self.steps[-1][2]
        batch = operands[batch_at[0]].shape[batch_at[1]] if batch_at else 0
        if torch.jit.is_tracing():
            # the plain operations (what a trace replays need not match this machine), with
            # the batch size a traced value rather than a number to write into code
            shapes = _resolve_shapes(self.steps, batch, eager=True)
            return run_steps(self.steps, operands, shapes, eager=False)
        runner = self._runners.get(batch)
        if runner is None:
            if len(self._runners) >= _MAX_SIZED_BATCHES:
                self._runners.clear()
            shapes = _resolve_shapes(self.steps, batch, eager=True)
            runner = self._runners[batch] = compile_runner(self.steps, shapes, eager=True)
        return runner(torch.is_grad_enabled() and operands[0].device.type == "cpu", *operands)


def _sized(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """``shape`` with each ``-k`` replaced by ``batch * k`` (explicit sizes, no ``-1`` to infer,
    so symbolic batch sizes under ``torch.export`` need no divisibility guards)."""
    return tuple(batch * -n if n < 0 else n for n in shape)


def _resolve_shapes(steps: Sequence, batch: int, eager: bool = False) -> tuple:
    """Every reshape target of ``steps`` for a batch of ``batch`` rows: the operands' views,
    then (left, right, result, oriented, dot) per step, then the output's view (``()``: no
    reshape). ``oriented``: whether the step's product needs its backward oriented (see
    :mod:`factlin._matmul`); only for ``eager`` calls (compilers pick their own kernels).
    ``dot``: whether the step's matrices are a row and a column (a batched dot product, run as
    a product and a sum: see :func:`_is_dot`)."""
    *pairwise, (_, _, _, squeeze, unsqueeze) = steps
    resolved = []
    for step in pairwise:
        m, k, n = _sized(step[10], batch)
        resolved.append((
            _sized(step[5], batch),
            _sized(step[7], batch),
            _sized(step[9], batch),
            eager and not step[8] and backward_is_narrow(m, k, n),
            not step[8] and m == 1 and n == 1,
        ))  # fmt: skip
    return (
        tuple(_sized(shape, batch) for shape in squeeze),
        tuple(resolved),
        _sized(unsqueeze, batch),
    )


def _is_dot(m: int, n: int, batched: int) -> bool:
    """Whether a batched product of ``(m, k) @ (k, n)`` matrices is a batched dot product (a row
    against a column), which runs as an elementwise product and a sum: BLAS's batched kernel
    goes through it matrix by matrix (measured, 8128 dots of length 32 on strided operands:
    512 us in ``bmm``, 990 us copying them first, 81 us as a product and a sum)."""
    return m == 1 and n == 1 and batched > 1


def run_steps(
    steps: Sequence,
    operands: Sequence[torch.Tensor],
    shapes: Optional[tuple] = None,
    eager: bool = False,
) -> torch.Tensor:
    """Execute compiled ``steps`` (see :class:`ContractionPlan`) on ``operands``.

    Plain constants in, so ``torch.compile`` traces it without a plan object in the graph. An
    empty permutation or shape means the operand is already laid out as needed. ``shapes``:
    the reshape targets for this batch size (:func:`_resolve_shapes`), computed if not given.
    ``eager``: run CPU kernels' layout fixes (oriented backward products, unit strides for
    batched products); left to the compiler otherwise.
    """
    *pairwise, (final_sum, final_perm, batch_at, _, _) = steps
    if shapes is None:
        batch = operands[batch_at[0]].shape[batch_at[1]] if batch_at else 0
        shapes = _resolve_shapes(steps, batch)
    squeeze, step_shapes, unsqueeze = shapes
    # products whose backward autograd would orient badly get their own (CPU, grad on)
    orient = eager and torch.is_grad_enabled() and operands[0].device.type == "cpu"
    working = list(operands)
    if squeeze:  # drop size-1 modes (views)
        working = [w.reshape(shape) if shape else w for w, shape in zip(working, squeeze)]
    for step, (left_shape, right_shape, result_shape, oriented, dot) in zip(pairwise, step_shapes):
        left_at, right_at, left_sum, right_sum, left_perm, _, right_perm, _, product, _, _ = step
        left, right = working[left_at], working[right_at]
        del working[max(left_at, right_at)]
        del working[min(left_at, right_at)]
        if left_sum:
            left = left.sum(left_sum)
        if right_sum:
            right = right.sum(right_sum)
        if left_perm:
            left = left.permute(left_perm)
        if left_shape:
            left = left.reshape(left_shape)
        if right_perm:
            right = right.permute(right_perm)
        if right_shape:
            right = right.reshape(right_shape)
        if product:
            result = left * right
        elif dot and left.dim() == 3:
            result = (left * right.transpose(1, 2)).sum(-1, keepdim=True)
        else:
            if eager and left.dim() == 3:
                # a batched product needs each matrix with a unit stride, or bmm crawls (7x
                # measured on CP's rank-innermost views): one explicit copy instead
                left, right = _unit_strided(left), _unit_strided(right)
            if oriented and orient:
                result = oriented_matmul(left, right)
            else:
                result = torch.matmul(left, right)
        working.append(result.reshape(result_shape) if result_shape else result)
        # drop the names now: else this step's inputs and unreshaped result stay alive while
        # the next step copies and multiplies (3 intermediates at once instead of 2)
        del left, right, result
    result = working[0]
    if final_sum:
        result = result.sum(final_sum)
    if final_perm:
        result = result.permute(final_perm)
    if unsqueeze:  # put the size-1 modes back (a view)
        result = result.reshape(unsqueeze)
    return result


def compile_runner(steps: Sequence, shapes: tuple, eager: bool) -> Callable[..., torch.Tensor]:
    """:func:`run_steps` for one batch size, as straight-line Python: the same operations,
    without the interpreting loop (unpacking each step, testing each field), which at small
    batches costs as much as the kernels (Tucker on 3+3 modes, batch 1: ~125 us against ~75 us
    for the straight-line code). Called as ``runner(orient, *operands)``, ``orient`` being
    :func:`run_steps`'s: grad on, eager, on a CPU."""
    *pairwise, (final_sum, final_perm, _, _, _) = steps
    squeeze, step_shapes, unsqueeze = shapes
    n_operands = len(steps)  # the pairwise steps join them two by two, then the final step
    lines = [f"def run(orient, {', '.join(f'o{i}' for i in range(n_operands))}):"]
    names = [f"o{i}" for i in range(n_operands)]
    for i, shape in enumerate(squeeze):
        if shape:
            lines.append(f"    o{i} = o{i}.reshape({shape!r})")
    for index, (step, step_shape) in enumerate(zip(pairwise, step_shapes)):
        left_at, right_at, left_sum, right_sum, left_perm, _, right_perm, _, product, _, _ = step
        left_shape, right_shape, result_shape, oriented, dot = step_shape
        left, right = names[left_at], names[right_at]
        del names[max(left_at, right_at)]
        del names[min(left_at, right_at)]
        # drop each input's name once its view is taken: where the reshape copied, the
        # original is freed before the other operand's copy and the product allocate (at most
        # 2 intermediates alive); an intermediate's view first, so that its original is gone
        # before an operand's copy is made
        sides = [
            ("left", left, left_sum, left_perm, left_shape),
            ("right", right, right_sum, right_perm, right_shape),
        ]
        sides.sort(key=lambda side: not side[1].startswith("t"))
        for side, source, sums, perm, shape in sides:
            lines.append(f"    {side} = {_view_code(source, sums, perm, shape)}")
            if source.startswith("t"):
                lines.append(f"    del {source}")
        dot_code = "result = (left * right.transpose(1, 2)).sum(-1, keepdim=True)"
        if product:
            lines.append("    result = left * right")
        elif dot and left_shape and len(left_shape) == 3:
            lines.append(f"    {dot_code}")
        elif dot:  # (whether it is batched is only known at run time)
            lines.append("    if left.dim() == 3:")
            lines.append(f"        {dot_code}")
            lines.append("    else:")
            lines.append("        result = torch.matmul(left, right)")
        else:
            if eager and (not left_shape or len(left_shape) == 3):  # (else known 2-d)
                lines.append("    if left.dim() == 3:")
                lines.append("        left, right = _unit_strided(left), _unit_strided(right)")
            if oriented and eager:
                lines.append(
                    "    result = (oriented_matmul if orient else torch.matmul)(left, right)"
                )
            else:
                lines.append("    result = torch.matmul(left, right)")
        name = f"t{index}"
        reshape = f".reshape({result_shape!r})" if result_shape else ""
        lines.append(f"    {name} = result{reshape}")
        lines.append("    del left, right, result")
        names.append(name)
    result = _view_code(names[0], final_sum, final_perm, unsqueeze)
    lines.append(f"    return {result}")
    # defined against this module's globals: torch, oriented_matmul, _unit_strided are looked
    # up when it runs, as run_steps' are
    namespace: dict = {}
    exec(compile("\n".join(lines), "<factlin plan>", "exec"), globals(), namespace)  # noqa: S102
    return namespace["run"]


def _view_code(name: str, sums: tuple, perm: tuple, shape: tuple) -> str:
    """Source for ``name`` summed over ``sums``, permuted by ``perm``, reshaped to ``shape``
    (each skipped when empty), as :func:`run_steps` does."""
    code = name
    if sums:
        code += f".sum({sums!r})"
    if perm:
        code += f".permute({perm!r})"
    if shape:
        code += f".reshape({shape!r})"
    return code


def _unit_strided(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (3-d), copied to contiguous unless one of its matrix dims has unit stride."""
    strides = tensor.stride()
    if strides[2] == 1 or strides[1] == 1:
        return tensor
    return tensor.contiguous()


@dataclass(frozen=True)
class _Compiled:
    """One pairwise step, compiled, with its modelled cost and the result's mode order."""

    step: Optional[Step]
    order: str
    seconds: float
    flops: int
    size: int


class _ModeSizes(dict):
    """Sizes of modes (one letter each) that also answers, and remembers, the size of a string
    of modes: the product of its letters' (the planner asks for the same groups many times)."""

    def __missing__(self, modes: str) -> int:
        if len(modes) == 1:
            raise KeyError(modes)
        value = self[modes] = math.prod(self[c] for c in modes)
        return value


def _is_view(order: str, groups: Sequence[str], sizes: dict[str, int]) -> bool:
    """Whether a contiguous tensor with modes ``order`` reshapes to ``groups`` without a copy:
    every group's modes adjacent and in the group's order (size-1 modes do not matter)."""
    kept = [c for c in order if sizes[c] > 1]
    for group in groups:
        members = [c for c in group if sizes[c] > 1]
        if not members:
            continue
        start = kept.index(members[0]) if members[0] in kept else -1
        if kept[start : start + len(members)] != members:
            return False
    return True


def _batch_innermost(order: str, batched: str, sizes: dict[str, int], elementwise: bool) -> bool:
    """Whether a batched matrix product's operand, laid out as ``order``, has a batched mode
    innermost: no matrix dim then has a unit stride, and :func:`run_steps` copies it."""
    kept = [c for c in order if sizes[c] > 1]
    return not elementwise and bool(kept) and kept[-1] in batched


def fresh_seconds(elements: int) -> float:
    """Modelled cost of allocating a buffer of ``elements`` anew on every call: its page faults,
    where the allocator cannot keep it (see :data:`SECONDS_PER_FRESH_ELEMENT`)."""
    return SECONDS_PER_FRESH_ELEMENT * elements if elements > _FRESH_ELEMENTS else 0.0


def copy_seconds(current: str, target: str, sizes: dict[str, int]) -> float:
    """Modelled time of permuting a contiguous tensor with modes ``current`` into ``target``
    order: free when nothing moves; cheaper when the innermost mode stays innermost (the copy
    moves contiguous runs) than when it becomes strided (a gather). The copy is a new buffer."""
    moved = [c for c in current if sizes[c] > 1]
    wanted = [c for c in target if sizes[c] > 1]
    if moved == wanted:
        return 0.0
    elements = math.prod(sizes[c] for c in current)
    runs_kept = bool(moved) and moved[-1] == wanted[-1]
    copying = SECONDS_PER_COPIED_ELEMENT * elements * (1 if runs_kept else _GATHER_PENALTY)
    return copying + fresh_seconds(elements)


def step_seconds(
    left: str,
    right: str,
    keep: frozenset[str],
    sizes: dict[str, int],
    batch_mode: str,
    final_order: Optional[str] = None,
    backward: bool = False,
    build: bool = True,
) -> _Compiled:
    """Compile the contraction of tensors with (contiguous) modes ``left`` and ``right``,
    keeping the modes in ``keep``; returns the cheaper orientation under the time model. With
    ``final_order`` (the last step), the cost of permuting the result into it counts too. With
    ``backward``, the time of the step's share of the backward pass counts too. Without
    ``build`` (a search pricing candidates), only the cost and the result's order are filled
    in, not the step."""
    options = step_options(left, right, keep, sizes, batch_mode, final_order, backward, build)
    return min(options, key=lambda compiled: compiled.seconds)


def step_options(
    left: str,
    right: str,
    keep: frozenset[str],
    sizes: dict[str, int],
    batch_mode: str,
    final_order: Optional[str] = None,
    backward: bool = False,
    build: bool = True,
) -> list[_Compiled]:
    """Both orientations of :func:`step_seconds`' step (their results' mode orders differ)."""
    if not isinstance(sizes, _ModeSizes):
        sizes = _ModeSizes(sizes)
    options = []
    for swapped in (False, True):
        a, b = (right, left) if swapped else (left, right)
        compiled = _compile_oriented(a, b, keep, sizes, batch_mode, swapped, backward, build)
        if final_order is not None:
            extra = copy_seconds(compiled.order, final_order, sizes) * (2 if backward else 1)
            compiled = dataclasses.replace(compiled, seconds=compiled.seconds + extra)
        options.append(compiled)
    return options


def _compile_oriented(
    a: str, b: str, keep: frozenset[str], sizes: _ModeSizes, batch_mode: str, swapped: bool,
    backward: bool, build: bool = True,
) -> _Compiled:  # fmt: skip
    size = sizes.__getitem__

    shared = set(a) & set(b)
    a_sum = [c for c in a if c not in shared and c not in keep]
    b_sum = [c for c in b if c not in shared and c not in keep]
    a_rest = "".join(c for c in a if c not in a_sum)
    b_rest = "".join(c for c in b if c not in b_sum)
    # The larger operand fixes the order of the batched and the summed modes.
    leader = a_rest if size(a) >= size(b) else b_rest
    batched = "".join(c for c in leader if c in shared and c in keep)
    summed = "".join(c for c in leader if c in shared and c not in keep)
    a_free = "".join(c for c in a_rest if c not in shared)
    b_free = "".join(c for c in b_rest if c not in shared)
    nb, m, n, k = size(batched), size(a_free), size(b_free), size(summed)
    product = not summed
    # broadcast products and batched dot products run elementwise (then a sum, for a dot)
    elementwise = product or _is_dot(m, n, nb)
    seconds = SECONDS_PER_STEP
    if a_sum:
        seconds += SECONDS_PER_ELEMENT * size(a) + SECONDS_PER_STEP
    if b_sum:
        seconds += SECONDS_PER_ELEMENT * size(b) + SECONDS_PER_STEP
    if elementwise:
        seconds += SECONDS_PER_PRODUCT_ELEMENT * nb * m * n * k
    else:
        seconds += matmul_seconds(nb, m, n, k)
    seconds += fresh_seconds(nb * m * n)  # the result
    a_groups = (batched, a_free, summed) if not product else (batched, a_free)
    b_groups = (batched, summed, b_free) if not product else (batched, b_free)
    copies = 0.0
    for rest, groups in ((a_rest, a_groups), (b_rest, b_groups)):
        if not _is_view(rest, groups, sizes) or _batch_innermost(rest, batched, sizes, elementwise):
            copies += copy_seconds(rest, "".join(groups), sizes)
    seconds += copies
    if backward:
        # each copy is copied back; the two gradients are two broadcast products (then sums),
        # or two matrix products, each run in its cheaper orientation (see factlin._matmul)
        seconds += copies
        if elementwise:
            # each gradient: the output gradient times the other operand (full size), then
            # summed over the broadcast modes
            full = nb * m * n * k
            seconds += 2 * (SECONDS_PER_PRODUCT_ELEMENT * full + fresh_seconds(full))
        else:
            seconds += min(matmul_seconds(nb, m, k, n), matmul_seconds(nb, k, m, n))
            seconds += min(matmul_seconds(nb, k, n, m), matmul_seconds(nb, n, k, m))
            seconds += fresh_seconds(nb * m * k) + fresh_seconds(nb * k * n)  # the gradients
    order = batched + a_free + b_free
    flops = 2 * nb * m * n * k
    if not build:
        return _Compiled(None, order, seconds, flops, size(order))

    def dim(modes: str) -> int:
        # -k stands for (batch size) * k: the batch size is read off the input at call time
        if batch_mode and batch_mode in modes:
            return -size(modes.replace(batch_mode, ""))
        return size(modes)

    # Groups of modes each operand is brought to: (batched, free, summed) for a matmul (without
    # the batched group when there is none); (batched, free, 1) against (batched, 1, free) for a
    # broadcast product.
    if batched:
        a_groups, b_groups = [batched, a_free, summed], [batched, summed, b_free]
    else:
        a_groups, b_groups = [a_free, summed], [summed, b_free]
    if product:
        a_groups[-1] = b_groups[-2] = ""
    a_perm = _permutation(a_rest, "".join(a_groups))
    b_perm = _permutation(b_rest, "".join(b_groups))
    a_shape = _reshape(a_groups, dim)
    b_shape = _reshape(b_groups, dim)
    result_groups = [batched, a_free, b_free] if batched else [a_free, b_free]
    result_shape = tuple(dim(c) for c in order) or (1,)
    if all(len(g) == 1 for g in result_groups):
        result_shape = ()
    a_sum_dims = tuple(a.index(c) for c in a_sum)
    b_sum_dims = tuple(b.index(c) for c in b_sum)
    # positions are filled in by the caller; (left, right) = (a, b) in this orientation
    step: Step = (
        int(swapped), int(not swapped), a_sum_dims, b_sum_dims,
        a_perm, a_shape, b_perm, b_shape, product, result_shape,
        (dim(a_free), dim(summed), dim(b_free)),
    )  # fmt: skip
    return _Compiled(step, order, seconds, flops, size(order))


def _permutation(current: str, target: str) -> tuple[int, ...]:
    """Permutation taking modes ``current`` to ``target``; empty when it is the identity."""
    perm = tuple(current.index(c) for c in target)
    return () if perm == tuple(range(len(current))) else perm


def _reshape(groups: Sequence[str], dim) -> tuple[int, ...]:
    """Shape merging each group of modes into one dimension; empty when every group is one mode
    already (no reshape needed)."""
    if all(len(g) == 1 for g in groups):
        return ()
    return tuple(dim(g) for g in groups)


def _legs(subset: int, terms: Sequence[str], output: str) -> frozenset[str]:
    """Modes of the tensor contracted from the operands in ``subset``: those it holds that are
    also held by an operand outside it or by the output."""
    inside, outside = set(), set(output)
    for position, term in enumerate(terms):
        (inside if subset >> position & 1 else outside).update(term)
    return frozenset(inside & outside)


class _Pricer:
    """:func:`step_seconds` without building the step, remembered for one planning call: the
    searches of one plan price many of the same pairs."""

    def __init__(self, sizes: dict[str, int], batch_mode: str, backward: bool) -> None:
        self.sizes = sizes if isinstance(sizes, _ModeSizes) else _ModeSizes(sizes)
        self.batch_mode = batch_mode
        self.backward = backward
        self.memo: dict[tuple, list[_Compiled]] = {}
        self._legs: dict[tuple, dict[int, frozenset[str]]] = {}

    def __call__(
        self, left: str, right: str, legs: frozenset[str], final: Optional[str] = None
    ) -> _Compiled:
        return min(self.options(left, right, legs, final), key=lambda c: c.seconds)

    def legs_memo(self, terms: Sequence[str], output: str) -> Callable[[int], frozenset[str]]:
        """:func:`_legs` for ``terms`` and ``output``, remembered per subset."""
        memo = self._legs.setdefault((tuple(terms), output), {})

        def legs(subset: int) -> frozenset[str]:
            value = memo.get(subset)
            if value is None:
                value = memo[subset] = _legs(subset, terms, output)
            return value

        return legs

    def options(
        self, left: str, right: str, legs: frozenset[str], final: Optional[str] = None
    ) -> list[_Compiled]:
        """Both orientations (see :func:`step_options`)."""
        key = (left, right, legs, final)
        options = self.memo.get(key)
        if options is None:
            options = self.memo[key] = step_options(
                left, right, legs, self.sizes, self.batch_mode, final, self.backward, False
            )
        return options


def _step_lower_bound(backward: bool) -> Callable[[int, int, int, int], float]:
    """A lower bound of :func:`step_seconds` from the sizes of the step's batched, left-free,
    right-free and summed modes (``summed`` 0 when nothing is summed): the step's cost in its
    cheaper orientation without the permutation copies, which depend on the operands' layouts
    (everything else in :func:`_compile_oriented` depends on these sizes alone)."""

    memo: dict[tuple[int, int, int, int], float] = {}

    def bound(nb: int, m: int, n: int, summed: int) -> float:
        key = (nb, m, n, summed)
        seconds = memo.get(key)
        if seconds is None:
            seconds = memo[key] = _bound(nb, m, n, summed)
        return seconds

    def _bound(nb: int, m: int, n: int, summed: int) -> float:
        k = max(summed, 1)
        full = nb * m * n * k
        seconds = SECONDS_PER_STEP + fresh_seconds(nb * m * n)
        if not summed or _is_dot(m, n, nb):
            seconds += SECONDS_PER_PRODUCT_ELEMENT * full
            if backward:
                seconds += 2 * (SECONDS_PER_PRODUCT_ELEMENT * full + fresh_seconds(full))
            return seconds
        seconds += min(matmul_seconds(nb, m, n, k), matmul_seconds(nb, n, m, k))
        if backward:
            seconds += min(matmul_seconds(nb, m, k, n), matmul_seconds(nb, k, m, n))
            seconds += min(matmul_seconds(nb, k, n, m), matmul_seconds(nb, n, k, m))
            seconds += fresh_seconds(nb * m * k) + fresh_seconds(nb * k * n)
        return seconds

    return bound


def _search_exhaustive(
    terms: Sequence[str], output: str, sizes: dict[str, int], batch_mode: str, allowed,
    backward: bool = False, price=None,
) -> Optional[list[tuple[int, int]]]:  # fmt: skip
    """Cheapest pairwise order (as a binary tree of operand subsets) by dynamic programming over
    subsets, splitting every subset into two connected parts; ``None`` if none is allowed.

    Mode sets are bit masks. A split is priced (:func:`step_seconds`) only when its parts'
    costs plus a lower bound of the step's own cost (:func:`_step_lower_bound`, from the
    sizes of its matrix product alone) can still beat the best split found: most splits of a
    fully connected network (CP's rank mode joins every factor) are discarded unpriced."""
    if price is None:
        price = _Pricer(sizes, batch_mode, backward)
    n = len(terms)
    full = (1 << n) - 1
    bit = {c: 1 << i for i, c in enumerate(sorted(set("".join(terms)) | set(output)))}

    def mask_of(modes: str) -> int:
        value = 0
        for c in modes:
            value |= bit[c]
        return value

    letter_of = {b: c for c, b in bit.items()}
    size_memo: dict[int, int] = {0: 1}

    def size(mask: int) -> int:
        value = size_memo.get(mask)
        if value is None:
            value = 1
            rest = mask
            while rest:
                low = rest & -rest
                value *= sizes[letter_of[low]]
                rest ^= low
            size_memo[mask] = value
        return value

    term_masks = [mask_of(t) for t in terms]
    union = [0] * (full + 1)
    for subset in range(1, full + 1):
        low = subset & -subset
        union[subset] = union[subset ^ low] | term_masks[low.bit_length() - 1]
    output_mask = mask_of(output)
    lower_bound = _step_lower_bound(backward)
    orders_kept = 1 if n > _MAX_EXHAUSTIVE_ORDERS else _ORDERS_KEPT
    # best[subset]: up to _ORDERS_KEPT (seconds, result order, (left, index), (right, index))
    # with distinct result orders, cheapest first: the cheapest way to a subset may leave its
    # modes in an order that costs a copy later, which a slightly dearer one avoids
    best: dict[int, list[tuple[float, str, Optional[tuple[int, int]], Optional[tuple[int, int]]]]]
    best = {1 << i: [(0.0, term, None, None)] for i, term in enumerate(terms)}
    masks = {1 << i: term_masks[i] for i in range(n)}
    for subset in sorted(range(1, full + 1), key=lambda s: bin(s).count("1")):
        if subset in best:
            continue
        keep = union[subset] & (union[full ^ subset] | output_mask)
        legs = frozenset(letter_of[b] for b in bit.values() if keep & b)
        if subset != full and not allowed(legs):
            continue
        low = subset & -subset
        final = output if subset == full else None
        splits = []
        part = (subset - 1) & subset
        while part:
            if part & low:
                rest = subset ^ part
                if part in best and rest in best:
                    left_mask, right_mask = masks[part], masks[rest]
                    shared = left_mask & right_mask
                    if shared:
                        step = lower_bound(
                            size(shared & keep), size(left_mask & keep & ~shared),
                            size(right_mask & keep & ~shared),
                            size(shared & ~keep) if shared & ~keep else 0,
                        )  # fmt: skip
                        bound = best[part][0][0] + best[rest][0][0] + step
                        splits.append((bound, step, part, rest))
            part = (part - 1) & subset
        # best first (the bound uses each part's cheapest order): once a split's bound cannot
        # beat the orders kept, no later one can
        splits.sort()
        kept: dict[str, tuple[float, str, tuple[int, int], tuple[int, int]]] = {}
        limit = math.inf
        for bound, step, part, rest in splits:
            if bound >= limit:
                break
            for i, left_entry in enumerate(best[part]):
                for j, right_entry in enumerate(best[rest]):
                    below = left_entry[0] + right_entry[0]
                    if below + step >= limit:
                        continue
                    # (the cheaper orientation only: a plan's path does not record another)
                    compiled = price(left_entry[1], right_entry[1], legs, final)
                    seconds = below + compiled.seconds
                    current = kept.get(compiled.order)
                    if current is None or seconds < current[0]:
                        kept[compiled.order] = (seconds, compiled.order, (part, i), (rest, j))
                        ranked = sorted(entry[0] for entry in kept.values())
                        limit = ranked[0] * _ORDER_MARGIN
                        if len(ranked) >= orders_kept:
                            limit = min(limit, ranked[orders_kept - 1])
        if kept:
            entries = sorted(kept.values())[:orders_kept]
            best[subset] = [e for e in entries if e[0] <= entries[0][0] * _ORDER_MARGIN]
            masks[subset] = keep
    if full not in best:
        return None
    # Turn the tree into a sequence of (position, position) pairs on a working list.
    pairs: list[tuple[int, int]] = []
    working: list[tuple[int, int]] = [(1 << i, 0) for i in range(n)]

    def emit(node: tuple[int, int]) -> None:
        _, _, left, right = best[node[0]][node[1]]
        if left is None or right is None:
            return
        emit(left)
        emit(right)
        i, j = working.index(left), working.index(right)
        pairs.append((i, j))
        for position in sorted((i, j), reverse=True):
            del working[position]
        working.append(node)

    emit((full, 0))
    return pairs


def _search_greedy(
    terms: Sequence[str], output: str, sizes: dict[str, int], batch_mode: str, allowed,
    backward: bool = False, price: Optional[_Pricer] = None,
) -> list[tuple[int, int]]:  # fmt: skip
    """Repeatedly contract the connected pair whose step is cheapest (for many operands)."""
    if price is None:
        price = _Pricer(sizes, batch_mode, backward)
    legs_of = price.legs_memo(terms, output)
    working = [(1 << i, term, frozenset(term)) for i, term in enumerate(terms)]
    pairs: list[tuple[int, int]] = []
    while len(working) > 1:
        options = []
        last = len(working) == 2
        for i in range(len(working)):
            for j in range(i + 1, len(working)):
                (si, ti, mi), (sj, tj, mj) = working[i], working[j]
                if not last and mi.isdisjoint(mj):
                    continue
                legs = legs_of(si | sj)
                if not last and not allowed(legs):
                    continue
                compiled = price(ti, tj, legs)
                options.append((compiled.seconds, i, j, compiled.order))
        if not options:  # nothing connected is allowed: take the first pair
            legs = legs_of(working[0][0] | working[1][0])
            options = [(0.0, 0, 1, price(working[0][1], working[1][1], legs).order)]
        _, i, j, order = min(options)
        subset = working[i][0] | working[j][0]
        pairs.append((i, j))
        del working[j]
        del working[i]
        working.append((subset, order, frozenset(order)))
    return pairs


def _compile_path(
    terms: Sequence[str], output: str, sizes: dict[str, int], batch_mode: str,
    path: Sequence[tuple[int, int]], backward: bool = False,
) -> tuple[tuple, int, int, float, int]:  # fmt: skip
    """Compile ``path`` to steps; returns (steps, flops, largest intermediate, seconds,
    elements written)."""
    working = [(1 << i, term) for i, term in enumerate(terms)]
    steps: list = []
    flops = largest = written = 0
    seconds = 0.0
    for step_index, (i, j) in enumerate(path):
        (si, ti), (sj, tj) = working[i], working[j]
        legs = _legs(si | sj, terms, output)
        last = step_index == len(path) - 1
        final = output if last else None
        compiled = step_seconds(ti, tj, legs, sizes, batch_mode, final, backward)
        left_is_i = compiled.step[0] == 0
        positions = (i, j) if left_is_i else (j, i)
        steps.append(positions + compiled.step[2:])
        flops += compiled.flops
        largest = max(largest, compiled.size)
        written += compiled.size
        seconds += compiled.seconds
        for position in sorted((i, j), reverse=True):
            del working[position]
        working.append((si | sj, compiled.order))
    order = working[0][1]
    final_sum = tuple(order.index(c) for c in order if c not in output)
    remaining = "".join(c for c in order if c in output)
    final_perm = tuple(remaining.index(c) for c in output)
    if final_perm == tuple(range(len(output))):
        final_perm = ()
    elif not path:  # a lone operand: its permutation is not part of any step's cost
        seconds += copy_seconds(remaining, output, sizes) * (2 if backward else 1)
    steps.append((final_sum, final_perm, _batch_at(terms, batch_mode), (), ()))
    return tuple(steps), flops, largest, seconds, written


def plan_contraction(
    equation: str,
    shapes: Sequence[Sequence[int]],
    *,
    batch_mode: str = "",
    max_weight_intermediate: Optional[int] = None,
    with_backward: bool = False,
) -> ContractionPlan:
    """Choose and compile the contraction order of ``equation`` for operands of ``shapes``.

    Parameters
    ----------
    equation : str
        Einsum equation with an explicit output (``'...->...'``); every index of the output
        appears in some operand.
    shapes : sequence of tuple of int
        One shape per operand.
    batch_mode : str, optional
        The index letter whose size varies from call to call (left free in every reshape).
    max_weight_intermediate : int, optional
        Largest size allowed for an intermediate that does not hold ``batch_mode`` (one built
        from weight operands alone).
    with_backward : bool, optional
        Choose the order for a forward and a backward pass (training) rather than a forward
        alone: a step that is cheap forward may have costly gradient products. The plan's
        ``seconds`` then include the backward.

    Returns
    -------
    ContractionPlan
        Plans are immutable; identical requests share one (the search runs once per process).
    """
    return _plan_cached(
        equation,
        tuple(tuple(int(n) for n in shape) for shape in shapes),
        batch_mode,
        max_weight_intermediate,
        with_backward,
    )


@functools.lru_cache(maxsize=1024)
def _plan_cached(
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    batch_mode: str,
    max_weight_intermediate: Optional[int],
    backward: bool = False,
) -> ContractionPlan:
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"equation {equation!r} has {len(terms)} operands, got {len(shapes)}")
    squeezed = _squeezed(terms, output, shapes, batch_mode)
    if squeezed is not None:
        inner_equation, inner_shapes, views, output_shape = squeezed
        inner = _plan_cached(
            inner_equation, inner_shapes, batch_mode, max_weight_intermediate, backward
        )
        *pairwise, (final_sum, final_perm, _, _, _) = inner.steps
        final = (final_sum, final_perm, _batch_at(terms, batch_mode), views, output_shape)
        return ContractionPlan(
            equation, inner.path, (*pairwise, final), inner.flops,
            inner.largest_intermediate, inner.seconds, inner.elements_written,
        )  # fmt: skip
    sizes = _ModeSizes()
    for term, shape in zip(terms, shapes):
        sizes.update(zip(term, (int(n) for n in shape)))
    if len(terms) == 1:
        steps, flops, largest, seconds, written = _compile_path(
            terms, output, sizes, batch_mode, [], backward
        )
        return ContractionPlan(equation, (), steps, flops, largest, seconds, written)

    def allowed(legs: frozenset[str]) -> bool:
        if max_weight_intermediate is None or batch_mode in legs:
            return True
        return math.prod(sizes[c] for c in legs) <= max_weight_intermediate

    # Candidates, within a bounded planning time: our exhaustive search for small networks
    # (after absorbing vectors, e.g. CP's weights, into a factor for larger ones), opt_einsum's
    # greedy searches for the rest, and our greedy pass; the fastest under the time model
    # whose intermediates are allowed wins.
    price = _Pricer(sizes, batch_mode, backward)
    candidates = _candidate_paths(terms, output, sizes, batch_mode, allowed, backward, price)
    best = None
    for path in candidates:
        if path is None or not _respects(path, terms, output, allowed):
            continue
        compiled = _compile_path(terms, output, sizes, batch_mode, path, backward)
        if best is None or compiled[3] < best[1][3]:
            best = (path, compiled)
    if best is None:  # nothing respects the limits: the greedy order regardless
        path = _search_greedy(terms, output, sizes, batch_mode, allowed, backward, price)
        best = (path, _compile_path(terms, output, sizes, batch_mode, path, backward))
    path, (steps, flops, largest, seconds, written) = best
    path = tuple(map(tuple, path))
    return ContractionPlan(equation, path, steps, flops, largest, seconds, written)


def _candidate_paths(
    terms: Sequence[str], output: str, sizes: _ModeSizes, batch_mode: str, allowed,
    backward: bool, price: _Pricer,
) -> list[Optional[list[tuple[int, int]]]]:  # fmt: skip
    """The contraction orders :func:`plan_contraction` chooses from, found in bounded time.

    Up to :data:`_MAX_EXHAUSTIVE` operands: the exhaustive search (optimal under the time
    model, but for the result orders it keeps) and the greedy pass. Beyond: vectors are first
    absorbed into the smallest operand holding their modes (CP's weights, a layer's row; one
    broadcast product each, as every plan does somewhere), then the exhaustive search if that
    leaves few enough operands, else opt_einsum's greedy and a few seeded random-greedy trials
    (:data:`_RANDOM_GREEDY_BUDGET` operand pairs in all) and our greedy pass."""
    candidates: list[Optional[list[tuple[int, int]]]] = []
    search = (output, sizes, batch_mode, allowed, backward, price)
    if len(terms) <= _MAX_EXHAUSTIVE:
        candidates.append(_search_exhaustive(terms, *search))
        candidates.append(_search_greedy(terms, *search))
        if len(terms) <= _MAX_DYNAMIC_PROGRAMMING:  # a few ms: a second opinion on orders
            candidates.append(_opt_einsum_dynamic_programming(terms, output, sizes))
        return candidates
    prefix, reduced = _absorb_vectors(terms, output, price, batch_mode, allowed)
    if prefix and len(reduced) <= _MAX_EXHAUSTIVE:
        found = _search_exhaustive(reduced, *search)
        candidates.append(None if found is None else prefix + found)
    else:
        candidates.extend(_opt_einsum_paths(terms, output, sizes))
    candidates.append(_search_greedy(terms, *search))
    return candidates


def _absorb_vectors(
    terms: Sequence[str], output: str, price: _Pricer, batch_mode: str, allowed
) -> tuple[list[tuple[int, int]], list[str]]:
    """Pairs contracting each operand whose modes all belong to another operand (without the
    batch mode) into the smallest such one, and the working list of terms they leave."""
    working = list(terms)
    pairs: list[tuple[int, int]] = []
    while True:
        found = None
        for i, term in enumerate(working):
            if batch_mode and batch_mode in term:
                continue
            holders = [
                j for j, other in enumerate(working)
                if j != i and set(term) <= set(other) and not (batch_mode and batch_mode in other)
                and len(other) > len(term)
            ]  # fmt: skip
            if holders:
                j = min(holders, key=lambda j: price.sizes[working[j]])
                found = (i, j)
                break
        if found is None:
            return pairs, working
        i, j = found
        outside = set(output).union(*(t for k, t in enumerate(working) if k not in (i, j)))
        legs = frozenset((set(working[i]) | set(working[j])) & outside)
        if not allowed(legs):
            return pairs, working
        merged = price(working[i], working[j], legs).order
        pairs.append((i, j))
        working = [t for k, t in enumerate(working) if k not in (i, j)] + [merged]


def _batch_at(terms: Sequence[str], batch_mode: str) -> tuple[int, ...]:
    """(operand, axis) of the first operand holding ``batch_mode``; empty if none does."""
    holders = [k for k, term in enumerate(terms) if batch_mode and batch_mode in term]
    return (holders[0], terms[holders[0]].index(batch_mode)) if holders else ()


def _squeezed(
    terms: Sequence[str], output: str, shapes: Sequence[tuple[int, ...]], batch_mode: str
) -> Optional[tuple[str, tuple, tuple, tuple]]:
    """Without its size-1 modes (other than the batch mode), the equation, the shapes, the
    shapes each operand is viewed as (``()`` when unchanged; ``-1`` for the batch) and the
    output's full shape; ``None`` when there is no size-1 mode. Planning without them keeps
    every reshape of the plan free of unit dimensions, whose arbitrary strides make symbolic
    shape reasoning (``torch.export``) emit guards it cannot prove on some torch versions."""
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        sizes.update(zip(term, shape))
    unit = {c for c, n in sizes.items() if n == 1 and c != batch_mode}
    if not unit:
        return None

    def drop(term: str) -> str:
        return "".join(c for c in term if c not in unit)

    def shape_of(term: str) -> tuple[int, ...]:
        return tuple(-1 if c == batch_mode else sizes[c] for c in term)

    new_terms = [drop(t) for t in terms]
    equation = ",".join(new_terms) + "->" + drop(output)
    new_shapes = tuple(tuple(sizes[c] for c in t) for t in new_terms)
    views = tuple(shape_of(n) if n != t else () for t, n in zip(terms, new_terms))
    return equation, new_shapes, views, shape_of(output)


def _opt_einsum_paths(
    terms: Sequence[str], output: str, sizes: dict[str, int]
) -> list[Optional[list[tuple[int, int]]]]:
    """opt_einsum's orders, pairwise, for networks too large for the exhaustive search: its
    greedy search, its branch search with one branch (the greedy choice, looking ahead), and a
    bounded number of seeded random-greedy trials (its dynamic programming and wider branch
    searches explode on such networks: a CP weight is one hyperedge joining every factor; 2 s
    at 12 operands, a minute at 20).

    The searches are called with integer mode labels: they iterate over sets of labels, and
    integers hash alike in every process where strings do not (``PYTHONHASHSEED``), so the
    orders found, and the plan, are the same in every run."""
    if len(terms) < 3:
        return []
    inputs = [frozenset(map(ord, term)) for term in terms]
    output_set = frozenset(map(ord, output))
    size_dict = {ord(c): n for c, n in sizes.items() if len(c) == 1}
    # random-greedy trials cost about n**2 pair evaluations each: as many as the budget allows
    repeats = max(_MIN_RANDOM_GREEDY_REPEATS, _RANDOM_GREEDY_BUDGET // len(terms) ** 2)
    optimizers: list = [
        opt_einsum.paths.greedy,
        functools.partial(branch, nbranch=1),
        opt_einsum.RandomGreedy(max_repeats=min(repeats, _RANDOM_GREEDY_REPEATS)),
    ]
    state = random.getstate()  # random-greedy seeds Python's generator with its trial numbers
    try:
        paths = []
        for optimize in optimizers:
            try:
                path = optimize(inputs, output_set, size_dict)
            except (ValueError, TypeError):  # e.g. scalar operands opt_einsum does not take
                paths.append(None)
                continue
            pairwise = all(len(step) == 2 for step in path)
            paths.append([(int(i), int(j)) for i, j in path] if pairwise else None)
        return paths
    finally:
        random.setstate(state)


def _opt_einsum_dynamic_programming(
    terms: Sequence[str], output: str, sizes: dict[str, int]
) -> Optional[list[tuple[int, int]]]:
    """opt_einsum's dynamic programming on FLOPs plus intermediate sizes (integer labels, as
    in :func:`_opt_einsum_paths`), for small networks only."""
    inputs = [frozenset(map(ord, term)) for term in terms]
    size_dict = {ord(c): n for c, n in sizes.items() if len(c) == 1}
    try:
        path = DynamicProgramming(minimize="combo")(inputs, frozenset(map(ord, output)), size_dict)
    except (ValueError, TypeError):  # e.g. scalar operands opt_einsum does not take
        return None
    return [(int(i), int(j)) for i, j in path] if all(len(s) == 2 for s in path) else None


def _respects(path: Sequence[tuple[int, int]], terms: Sequence[str], output: str, allowed) -> bool:
    """Whether every intermediate of ``path`` (but the result) is allowed."""
    working = [1 << i for i in range(len(terms))]
    for step, (i, j) in enumerate(path):
        subset = working[i] | working[j]
        if step < len(path) - 1 and not allowed(_legs(subset, terms, output)):
            return False
        working = [s for k, s in enumerate(working) if k not in (i, j)] + [subset]
    return True
