"""Forward / forward+backward times of FactorizedLinear against nn.Linear on a CUDA device.

A compact companion of ``forward.py`` (which times the CPU): CUDA-event medians, every ratio
taken against a dense ``nn.Linear`` timed in the same run. Prints a markdown table, then the
targets' summary lines; ``--out`` also writes every row (times, the paths ``'auto'`` took, the
plans' step counts, FLOPs and elements written) as JSON, rewritten after each row.

Columns: ``fac``, ``rec``, ``auto`` are the three implementations; ``rec-fb`` is
``'reconstructed'`` with its factorized backward (:mod:`factlin._rebuilt_linear`) forced, for
the forward + backward only: the layer takes it on a CPU where the time model says it pays, and
this column is how to tell whether it would pay on a GPU.

    python benchmarks/gpu_forward.py [--dtype float32|bfloat16] [--reps 25] [--out FILE]
                                     [--modes 3] [--only TEXT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Callable

import torch
from _timing import geomean
from torch import nn

from factlin import FactorizedLinear, get_tensorized_shape
from factlin.factorizations._base import batch_bucket

LAYERS = [(768, 768), (768, 3072), (4096, 4096)]
FACTORIZATIONS = ["cp", "tucker", "tt"]
RANKS = [0.05, 0.2]
BATCHES = [1, 64, 1024, 8192]
IMPLEMENTATIONS = ["factorized", "reconstructed", "auto"]
#: Calls per CUDA-event sample (a single call at batch 1 is a few launches).
CALLS_PER_SAMPLE = 3


def _median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median milliseconds per call: CUDA events on a GPU, ``perf_counter`` elsewhere (a smoke
    run of this script on a CPU)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            begin = time.perf_counter()
        for _ in range(CALLS_PER_SAMPLE):
            fn()
        if cuda:
            end.record()
            sync()
            times.append(start.elapsed_time(end) / CALLS_PER_SAMPLE)
        else:
            times.append((time.perf_counter() - begin) * 1e3 / CALLS_PER_SAMPLE)
    return statistics.median(times)


def _timers(module: Callable, x: torch.Tensor, grad_out: torch.Tensor, params: list):
    def forward() -> None:
        with torch.no_grad():
            module(x)

    def forward_backward() -> None:
        torch.autograd.grad(module(x), [x, *params], grad_out)

    return forward, forward_backward


def _plan_stats(layer: FactorizedLinear, batch: int) -> dict:
    """Step count, FLOPs and elements written of the plans the layer runs at ``batch``."""
    weight, stats = layer.weight, {}
    for kind, bucket in (("contract", batch_bucket(batch)), ("tensor", 0)):
        for grad in (False, True):
            plan = weight._plan(kind, weight.n_layers > 1, bucket, grad)
            stats[f"{kind}_{'grad' if grad else 'nograd'}"] = {
                "n_steps": plan.n_steps,
                "flops": plan.flops,
                "elements_written": plan.elements_written,
                "cpu_seconds": plan.seconds,
            }
    return stats


def _summary(rows: list[dict]) -> list[str]:
    lines = []

    def report(title: str, items: list[tuple[float, str]], limit: float) -> None:
        if not items:
            return
        worst = max(items)
        above = sum(v > limit for v, _ in items)
        lines.append(
            f"- {title}: geomean {geomean(v for v, _ in items):.2f}, worst {worst[0]:.2f} "
            f"({worst[1]}); {above}/{len(items)} above {limit}"
        )

    for phase in ("fwd", "fb"):
        items = []
        for row in rows:
            best = min(row[phase]["factorized"], row[phase]["reconstructed"])
            items.append((row[phase]["auto"] / best, f"{row['name']} picks {row['auto'][phase]}"))
        report(f"auto / min(factorized, reconstructed), {phase}", items, 1.15)
    for factorization in FACTORIZATIONS:
        items = [
            (min(row["fb"][i] for i in IMPLEMENTATIONS) / row["fb"]["dense"], row["name"])
            for row in rows
            if row["factorization"] == factorization and row["batch"] >= 64
        ]
        report(f"best path / dense, fwd+bwd, {factorization}, B>=64", items, 1.0)
    items = [(row["fwd"]["auto"] / row["fwd"]["dense"], row["name"]) for row in rows]
    report("no-grad cached auto / dense", items, 1.1)
    items = [(row["fb"]["rec-fb"] / row["fb"]["reconstructed"], row["name"]) for row in rows]
    report("reconstructed with factorized backward / plain reconstructed, fwd+bwd", items, 1.0)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--only", default="", help="rows whose name contains this text")
    parser.add_argument("--device", default="cuda", help="'cpu' for a smoke run")
    parser.add_argument(
        "--modes", type=int, nargs="+", default=[3], help="tensorize each side to these orders"
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name_of_device = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    started = time.perf_counter()
    print(f"{name_of_device}; torch {torch.__version__}; {args.dtype}")
    print()
    print("| layer | fact | rank | B | dense fwd ms | fwd ÷dense fac/rec/auto | dense f+b ms "
          "| f+b ÷dense fac/rec/auto/rec-fb | auto fwd/f+b |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    for (in_features, out_features), order in itertools.product(LAYERS, args.modes):
        in_shape, out_shape = get_tensorized_shape(in_features, out_features, order)
        dense = nn.Linear(in_features, out_features, device=device, dtype=dtype)
        for factorization in FACTORIZATIONS:
            for rank in RANKS:
                layer = FactorizedLinear(
                    in_shape, out_shape, factorization=factorization, rank=rank,
                    device=device, dtype=dtype,
                )  # fmt: skip
                params = [p for p in layer.parameters() if p.requires_grad]
                for batch in BATCHES:
                    name = (
                        f"{in_features}x{out_features}/{order} {factorization} r={rank} B={batch}"
                    )
                    if args.only not in name:
                        continue
                    x = torch.randn(batch, in_features, device=device, dtype=dtype)
                    x.requires_grad_(True)
                    grad_out = torch.randn(batch, out_features, device=device, dtype=dtype)
                    dense_params = list(dense.parameters())
                    times = {"fwd": {}, "fb": {}}
                    dense_timers = _timers(dense, x, grad_out, dense_params)
                    times["fwd"]["dense"], times["fb"]["dense"] = (
                        _median_ms(t, args.reps, device) for t in dense_timers
                    )
                    for implementation in IMPLEMENTATIONS:
                        layer.implementation = implementation
                        fwd, fb = (
                            _median_ms(t, args.reps, device)
                            for t in _timers(layer, x, grad_out, params)
                        )
                        times["fwd"][implementation], times["fb"][implementation] = fwd, fb
                    bias = layer.bias

                    def rebuilt(inputs: torch.Tensor, layer=layer, bias=bias) -> torch.Tensor:
                        return layer.weight.rebuilt_linear(inputs, 0, bias)

                    times["fb"]["rec-fb"] = _median_ms(
                        _timers(rebuilt, x, grad_out, params)[1], args.reps, device
                    )
                    bucket = batch_bucket(batch)
                    auto = {
                        phase: layer._auto_choices.get((bucket, grad, cached, device.type), "?")[0]
                        for phase, grad, cached in (("fwd", False, True), ("fb", True, False))
                    }
                    rows.append({
                        "name": name, "layer": [in_features, out_features],
                        "modes": order, "factorization": factorization,
                        "rank": rank, "batch": batch,
                        "fwd": times["fwd"], "fb": times["fb"], "auto": auto,
                        "plans": _plan_stats(layer, batch),
                        "cpu_model_rebuilt_linear_pays": layer.weight.rebuilt_linear_pays(batch),
                    })  # fmt: skip
                    fwd = "/".join(f"{times['fwd'][i] / times['fwd']['dense']:.2f}"
                                   for i in IMPLEMENTATIONS)  # fmt: skip
                    fb = "/".join(f"{times['fb'][i] / times['fb']['dense']:.2f}"
                                  for i in [*IMPLEMENTATIONS, "rec-fb"])  # fmt: skip
                    print(
                        f"| {in_features}x{out_features}/{order} | {factorization} | {rank} "
                        f"| {batch} "
                        f"| {times['fwd']['dense']:.3f} | {fwd} | {times['fb']['dense']:.3f} "
                        f"| {fb} | {auto['fwd']}/{auto['fb']} |",
                        flush=True,
                    )
                    if args.out:
                        with open(args.out, "w") as file:
                            json.dump({"device": name_of_device,
                                       "torch": torch.__version__, "rows": rows}, file)  # fmt: skip
    print()
    for line in _summary(rows):
        print(line)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
