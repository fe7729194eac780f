"""Benchmark the forward and backward passes of factlin's FactorizedLinear.

For each layer shape x factorization x rank x batch of the grid, times the no-grad forward and
the forward + backward (gradients of the input and of every parameter) of factlin's three
implementations, of a dense ``nn.Linear`` of the same shape and, when tltorch imports, of
``tltorch.FactorizedLinear`` with the same factorization ('blocktt' for 'tt'), implementation and
parameter count (it gets factlin's resolved rank). All candidates of one configuration are timed
in interleaved rounds and summarized by medians, so ratios hold even on a noisy machine. Also
probes the memory of one factorized forward against the plan's largest intermediate.

Configurations expected to take more than ``--max-call-seconds`` per call (from FLOPs, then from
one timed call) or more than 4 GiB are skipped and recorded with the reason. Writes
``benchmarks/results/forward.json``, prints a markdown table and the summary of the targets.

Usage: ``python benchmarks/forward.py [--quick] [--only TEXT] [--threads N] [--out F] ...``
(``--help`` lists the options; ``--report FILE`` reprints the tables of a results file).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from _timing import (
    geomean,
    interleaved_medians,
    machine_description,
    peak_allocated_bytes,
    time_once,
)
from torch import nn

import factlin
from factlin.cost_model import choose_implementation
from factlin.factorizations._base import batch_bucket

try:
    import tltorch
except ImportError:  # the tltorch columns then read "–"
    tltorch = None

TLTORCH_NAMES = {"cp": "cp", "tucker": "tucker", "tt": "blocktt"}
RANKS: tuple[Any, ...] = (0.05, 0.2, "same")
BATCHES = (1, 64, 1024)
IMPLS = ("factorized", "reconstructed", "auto")
PHASES = ("fwd", "fwdbwd")  # no-grad forward; forward + backward
FLOP_RATE = 8e10  # FLOP/s of a float32 GEMM on one thread: estimates are lower bounds
KR_BYTES_PER_S = 3e8  # tltorch's CP rebuild writes a Khatri-Rao product: memory bound
MAX_BYTES = 4 * 2**30
RESULTS = Path(__file__).resolve().parent / "results" / "forward.json"


def layer_grid(quick: bool) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(name, in_shape, out_shape) of every tensorized layer benchmarked."""
    sizes = [(768, 768, 2), (768, 768, 3), (768, 3072, 2), (768, 3072, 3)]
    sizes += [(1024, 1024, 2), (1024, 1024, 3), (4096, 4096, 3)]
    if quick:
        sizes = [(768, 768, 2), (768, 768, 3), (768, 3072, 3)]
    grid = []
    for n_in, n_out, order in sizes:
        in_shape, out_shape = factlin.get_tensorized_shape(n_in, n_out, order=order)
        grid.append((f"{n_in}x{n_out}/{order}", in_shape, out_shape))
    return grid


def build_modules(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], factorization: str, rank: Any
) -> dict[str, nn.Module]:
    """The candidates of one configuration: dense, factlin's three paths, tltorch's two."""
    torch.manual_seed(0)
    base = factlin.FactorizedLinear(in_shape, out_shape, factorization=factorization, rank=rank)
    modules: dict[str, nn.Module] = {"dense": nn.Linear(base.in_features, base.out_features)}
    for impl in IMPLS:
        modules[impl] = copy.deepcopy(base)
        modules[impl].implementation = impl
    if tltorch is not None:
        resolved = list(base.rank) if isinstance(base.rank, tuple) else base.rank
        tl_layer = tltorch.FactorizedLinear(
            in_shape, out_shape, factorization=TLTORCH_NAMES[factorization], rank=resolved
        )
        for impl in IMPLS[:2]:
            modules[f"tl_{impl}"] = copy.deepcopy(tl_layer)
            modules[f"tl_{impl}"].implementation = impl
    return modules


def estimate(name: str, layer: factlin.FactorizedLinear, batch: int, grad: bool) -> tuple:
    """Rough (seconds, bytes) of one call of candidate ``name``, before running it."""
    weight, passes = layer.weight, 3 if grad else 1
    dense = 2 * batch * layer.in_features * layer.out_features
    plan = weight._plan("contract", False, batch_bucket(batch))
    factorized = (
        passes * weight.contract_flops(batch) / FLOP_RATE,
        4 * plan.largest_intermediate * (len(plan.steps) + 2 if grad else 3),
    )
    # The no-grad warm-up call rebuilds the matrix too, so the rebuild counts either way.
    seconds = passes * (dense + weight.matrix_flops()) / FLOP_RATE
    matrix_bytes = 4 * layer.in_features * layer.out_features
    reconstructed = (seconds, 3 * matrix_bytes)
    if name == "dense":
        return passes * dense / FLOP_RATE, 0
    if name in ("factorized", "tl_factorized"):
        return factorized
    if name == "auto":
        choice = choose_implementation(weight, batch, grad=grad, cached=not grad)
        return factorized if choice == "factorized" else reconstructed
    if name == "tl_reconstructed" and layer.factorization == "cp":
        # tensorly's cp_to_tensor builds a (tensor size / first mode) x rank Khatri-Rao product
        kr_bytes = 4 * math.prod(weight.tensor_shape[1:]) * weight.rank
        return seconds + passes * kr_bytes / KR_BYTES_PER_S, kr_bytes * passes
    return reconstructed


def make_call(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, grad: bool) -> Callable:
    """One forward (no grad), or forward + backward to the input and every parameter."""
    if not grad:
        return lambda: module(x)
    inputs = [x.detach().clone().requires_grad_(), *module.parameters()]
    return lambda: torch.autograd.grad(module(inputs[0]), inputs, grad_out)


def bench_batch(
    modules: dict[str, nn.Module], batch: int, args: argparse.Namespace, carry: dict
) -> dict:
    """Times (and memory) of every candidate at one batch size. ``carry`` holds what smaller
    batches taught: the candidates found too slow, and how much slower than estimated each ran."""
    layer = modules["factorized"]
    x = torch.randn(batch, layer.in_features)
    grad_out = torch.randn(batch, layer.out_features)
    row: dict[str, Any] = {"batch": batch, "times": {}, "skipped": {}, "rounds": {}}
    for phase in PHASES:
        grad = phase == "fwdbwd"
        calls, pilots, estimated = {}, {}, {}
        with torch.set_grad_enabled(grad):
            for name, module in modules.items():
                key = (name, phase)
                estimated[name], nbytes = estimate(name, layer, batch, grad)
                seconds = estimated[name] * carry["slowdown"].get(key, 1.0)
                reason = None
                if name != "dense":  # the reference is always measured
                    reason = carry["skips"].get(key) or _too_costly(seconds, nbytes, args)
                if reason is None:
                    call = make_call(module, x, grad_out, grad)
                    pilot = time_once(call)  # warm-up: plans, the inference cache, allocator
                    if pilot < 0.5:  # the warm-up can be much slower than later calls
                        pilot = time_once(call)
                    if pilot <= args.max_call_seconds or name == "dense":
                        calls[name], pilots[name] = call, pilot
                        continue
                    reason = f"one call took {pilot:.1f} s"
                row["skipped"][f"{name}/{phase}"] = reason
                carry["skips"][key] = reason if "batch" in reason else f"{reason} at batch {batch}"
            medians, rounds = interleaved_medians(
                calls, pilots, target_s=args.target_seconds, min_rounds=3
            )
        for name in ("factorized", "tl_factorized"):  # cost proportional to the batch
            if medians.get(name, 0.0) > 0.02:  # long enough for per-call costs not to matter
                carry["slowdown"][(name, phase)] = max(1.0, medians[name] / estimated[name])
        row["times"][phase], row["rounds"][phase] = medians, rounds
        row.setdefault("auto_choice", {})[phase] = choose_implementation(
            layer.weight, batch, grad=grad, cached=not grad
        )
    row["memory"] = memory_probe(modules, x, row["times"]["fwd"])
    return row


def _too_costly(seconds: float, nbytes: float, args: argparse.Namespace) -> str | None:
    if seconds > args.max_call_seconds:
        return f"estimated {seconds:.1f} s per call"
    if nbytes > MAX_BYTES:
        return f"estimated {nbytes / 2**30:.1f} GiB"
    return None


def memory_probe(modules: dict[str, nn.Module], x: torch.Tensor, measured: dict) -> dict:
    """Peak bytes allocated by one no-grad forward of each measured candidate, and the plan's.

    factorized: against the contraction plan's largest intermediate; reconstructed (cache
    cleared, so the rebuild is included): against the larger of the matrix and the output.
    """
    layer = modules["factorized"]
    batch, itemsize = x.shape[0], x.element_size()
    planned = {
        "factorized": layer.weight._plan("contract", False, batch_bucket(batch)),
        "reconstructed": layer.weight._plan("tensor", False, 0),
    }
    probe = {}
    for name in ("factorized", "reconstructed", "tl_factorized"):
        if name not in measured:
            continue
        if name == "reconstructed":
            modules[name].clear_cache()
        with torch.no_grad():
            peak = peak_allocated_bytes(lambda m=modules[name]: m(x))
        plan = planned[name.removeprefix("tl_")]
        plan_bytes = itemsize * max(plan.largest_intermediate, batch * layer.out_features)
        probe[name] = {"peak_bytes": peak, "plan_bytes": plan_bytes, "ratio": peak / plan_bytes}
    return probe


def warm_up(seconds: float = 0.2) -> None:
    """Throwaway calls, so the first configuration does not pay for thread pools, autograd and
    the C allocator adapting to large buffers (a CP layer: tltorch's rebuild allocates ~100 MB)."""
    modules = build_modules((24, 32), (24, 32), "cp", 0.05)
    for batch in (1, 64):
        x, grad_out = torch.randn(batch, 768), torch.randn(batch, 768)
        for module in modules.values():
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    call, deadline = make_call(module, x, grad_out, grad), time.perf_counter()
                    while time.perf_counter() - deadline < seconds:
                        call()


def run_grid(args: argparse.Namespace, save: Callable[[list[dict]], None]) -> list[dict]:
    """Benchmark every configuration; ``save`` is called with the rows after each one."""
    warm_up()
    rows = []
    ranks = RANKS[:2] if args.quick else RANKS
    batches = BATCHES[:2] if args.quick else BATCHES
    for layer_name, in_shape, out_shape in layer_grid(args.quick):
        for factorization in TLTORCH_NAMES:
            for rank in ranks:
                if args.only and args.only not in f"{layer_name} {factorization} {rank}":
                    continue
                started = time.perf_counter()
                modules = build_modules(in_shape, out_shape, factorization, rank)
                layer = modules["factorized"]
                config = {
                    "layer": layer_name,
                    "in_shape": in_shape,
                    "out_shape": out_shape,
                    "factorization": factorization,
                    "rank": rank,
                    "resolved_rank": layer.rank,
                    "params": {
                        "factlin": layer.weight.num_parameters(),
                        "dense": layer.in_features * layer.out_features,
                        "tltorch": _weight_params(modules.get("tl_factorized")),
                    },
                }
                carry: dict = {"skips": {}, "slowdown": {}}
                for batch in batches:
                    dense_flops = 2 * batch * layer.in_features * layer.out_features
                    row = {**config, **bench_batch(modules, batch, args, carry)}
                    row["flop_ratio"] = {
                        "factorized": layer.weight.contract_flops(batch) / dense_flops,
                        "reconstructed": 1 + layer.weight.matrix_flops() / dense_flops,
                    }
                    rows.append(row)
                save(rows)
                print(
                    f"  {layer_name} {factorization} rank={rank}: "
                    f"{time.perf_counter() - started:.1f} s",
                    flush=True,
                )
    return rows


def _weight_params(module: nn.Module | None) -> int | None:
    if module is None:
        return None
    return sum(p.numel() for name, p in module.named_parameters() if name != "bias")


# ---- reporting --------------------------------------------------------------------------------
def _ratio(times: dict, num: str, den: str) -> float | None:
    if num in times and den in times:
        return times[num] / times[den]
    return None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _label(row: dict, extra: str = "") -> str:
    text = f"{row['layer']} {row['factorization']} r={row['rank']} B={row['batch']}"
    return f"{text} {extra}".rstrip()


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| layer | fact | rank | params fl/tl | B | FLOPs fac÷dense | dense fwd ms | "
        "fwd ÷dense fac/rec/auto | dense f+b ms | f+b ÷dense fac/rec/auto | "
        "f+b fl÷tl fac/rec | auto fwd/f+b | mem fac peak÷plan |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        fwd, fb = r["times"]["fwd"], r["times"]["fwdbwd"]
        params = r["params"]
        mem = r["memory"].get("factorized", {}).get("ratio")

        def per_impl(times: dict, den: str, names: tuple = IMPLS) -> str:
            return "/".join(_fmt(_ratio(times, n, den.format(n=n))) for n in names)

        lines.append(
            f"| {r['layer']} | {r['factorization']} | {r['rank']} | "
            f"{params['factlin']}/{params['tltorch'] or '–'} | {r['batch']} | "
            f"{r['flop_ratio']['factorized']:.2f} | {_fmt(_ms(fwd, 'dense'), 3)} | "
            f"{per_impl(fwd, 'dense')} | {_fmt(_ms(fb, 'dense'), 3)} | {per_impl(fb, 'dense')} | "
            f"{per_impl(fb, 'tl_{n}', IMPLS[:2])} | "
            f"{r['auto_choice']['fwd'][0].upper()}/{r['auto_choice']['fwdbwd'][0].upper()} | "
            f"{_fmt(mem)} |"
        )
    return "\n".join(lines)


def _ms(times: dict, name: str) -> float | None:
    return times[name] * 1e3 if name in times else None


def summary(rows: list[dict]) -> list[str]:
    """One line per target, each followed by the configurations that miss it."""
    out: list[str] = []

    def report(title: str, items: list[tuple[float, str]], limit: float | None = None) -> None:
        worst = max(items, default=(math.nan, "n/a"))
        line = f"- {title}: geomean {geomean(v for v, _ in items):.2f}, "
        line += f"worst {worst[0]:.2f} ({worst[1]})"
        if limit is None:
            out.append(line)
            return
        misses = sorted((item for item in items if item[0] > limit), reverse=True)
        out.append(f"{line}; {len(misses)}/{len(items)} above {limit}")
        out.extend(f"    miss {value:.2f}  {label}" for value, label in misses)

    def ratios(phase: str, num: str, den: str, extra: str = "", keep=lambda r: True) -> list:
        return [
            (r["times"][phase][num] / r["times"][phase][den], _label(r, extra))
            for r in rows
            if num in r["times"][phase] and den in r["times"][phase] and keep(r)
        ]

    tl = ratios("fwdbwd", "factorized", "tl_factorized", "factorized")
    tl += ratios("fwdbwd", "reconstructed", "tl_reconstructed", "reconstructed")
    report("factlin/tltorch, fwd+bwd, same implementation (target geomean <= 0.5, all <= 1)", tl, 1)
    for phase in PHASES:
        items = []
        for r in rows:
            times = r["times"][phase]
            best = [times[n] for n in IMPLS[:2] if n in times]
            if "auto" in times and best:
                label = _label(r, f"(picks {r['auto_choice'][phase]})")
                items.append((times["auto"] / min(best), label))
        report(f"auto / min(factorized, reconstructed), {phase} (target <= 1.15)", items, 1.15)
    for factorization, limit in (("tucker", 1.0), ("tt", 1.0), ("cp", 1.5)):
        items = []
        for r in rows:
            times = r["times"]["fwdbwd"]
            measured = [(times[n], n) for n in IMPLS if n in times]
            if r["factorization"] == factorization and r["batch"] >= 64 and r["rank"] != "same":
                if measured:
                    best = min(measured)
                    bound = min(r["flop_ratio"].values())  # the cheaper path's FLOPs / dense
                    label = _label(r, f"best={best[1]}, FLOP ratio of cheaper path {bound:.2f}")
                    items.append((best[0] / times["dense"], label))
        title = f"best factlin path / dense, fwd+bwd, {factorization}, B>=64, rank<=0.2"
        report(f"{title} (target <= {limit})", items, limit)
    for impl in ("reconstructed", "auto"):
        items = ratios("fwd", impl, "dense")
        report(f"no-grad cached {impl} / dense, every batch (target <= 1.1)", items, 1.1)
    items = ratios(
        "fwd",
        "factorized",
        "dense",
        keep=lambda r: r["layer"].startswith("768x768") and r["rank"] == 0.05 and r["batch"] == 1,
    )
    report("batch 1: factorized no-grad / nn.Linear, 768x768 r=0.05 (target <= 3)", items, 3)
    for name in ("factorized", "reconstructed", "tl_factorized"):
        items = [(r["memory"][name]["ratio"], _label(r)) for r in rows if name in r["memory"]]
        if name == "factorized":
            report("memory peak / planned, factorized no-grad (target <= 2)", items, 2)
        else:
            report(f"for reference: memory peak / planned, {name} no-grad", items)
    items = []
    for r in rows:
        times = r["times"]["fwdbwd"]
        ours = [times[n] for n in IMPLS if n in times]
        theirs = [times[n] for n in ("tl_factorized", "tl_reconstructed") if n in times]
        if ours and theirs:
            items.append((min(ours) / min(theirs), _label(r)))
    report("for reference: best factlin path / best tltorch path, fwd+bwd", items)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a representative subset (< 2 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-call-seconds", type=float, default=2.5)
    parser.add_argument(
        "--target-seconds",
        type=float,
        default=None,
        help="time spent per configuration and phase (default 0.3, quick 0.1)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        help="configurations whose 'layer factorization rank' contains this, e.g. "
        "'768x768/3 tt' or 'tucker 0.2'",
    )
    parser.add_argument("--report", type=Path, help="only print the tables of a results file")
    args = parser.parse_args()
    if args.report is not None:
        results = json.loads(args.report.read_text())
        print_report(results["meta"], results["rows"])
        return
    if args.target_seconds is None:
        args.target_seconds = 0.1 if args.quick else 0.3
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # tensorly warns about order-2 TT ranks
    started = time.perf_counter()
    meta = {
        "machine": machine_description(),
        "torch": torch.__version__,
        "factlin": factlin.__version__,
        "tltorch": getattr(tltorch, "__version__", None),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "max_call_seconds": args.max_call_seconds,
        "threads": args.threads,
    }

    def save(rows: list[dict]) -> None:
        meta["wall_seconds"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))

    rows = run_grid(args, save)
    save(rows)
    print_report(meta, rows)
    print(f"\nwrote {args.out}")


def print_report(meta: dict, rows: list[dict]) -> None:
    wall = meta["wall_seconds"]
    print(f"\n{meta['machine']}; torch {meta['torch']}; {meta['date']}; wall {wall:.0f} s\n")
    print(markdown_table(rows))
    print("\nTimes are medians; ratios < 1 mean factlin is faster. Summary:")
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
