"""Forward / forward+backward times of FactorizedLinear against nn.Linear on a CUDA device.

A compact companion of ``forward.py`` (which times the CPU): CUDA-event medians, every ratio
taken against a dense ``nn.Linear`` timed in the same run. Prints a markdown table.

    python benchmarks/gpu_forward.py [--dtype float32|bfloat16] [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from factlin import FactorizedLinear, get_tensorized_shape

LAYERS = [(768, 768), (768, 3072), (4096, 4096)]
FACTORIZATIONS = ["cp", "tucker", "tt"]
RANKS = [0.05, 0.2]
BATCHES = [64, 1024, 8192]
IMPLEMENTATIONS = ["factorized", "reconstructed", "auto"]


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _timers(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def forward_backward() -> None:
        torch.autograd.grad(module(x), [x, *params], grad_out)

    return forward, forward_backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.dtype}")
    print()
    print("| layer | fact | rank | B | dense fwd ms | fwd ÷dense fac/rec/auto | dense f+b ms "
          "| f+b ÷dense fac/rec/auto |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for in_features, out_features in LAYERS:
        in_shape, out_shape = get_tensorized_shape(in_features, out_features, 3)
        dense = nn.Linear(in_features, out_features, device=device, dtype=dtype)
        for factorization in FACTORIZATIONS:
            for rank in RANKS:
                layer = FactorizedLinear(
                    in_shape, out_shape, factorization=factorization, rank=rank,
                    device=device, dtype=dtype,
                )  # fmt: skip
                for batch in BATCHES:
                    x = torch.randn(batch, in_features, device=device, dtype=dtype)
                    x.requires_grad_(True)
                    grad_out = torch.randn(batch, out_features, device=device, dtype=dtype)
                    dense_fwd, dense_fb = (
                        _median_ms(t, args.reps) for t in _timers(dense, x, grad_out)
                    )
                    ratios_fwd, ratios_fb = [], []
                    for implementation in IMPLEMENTATIONS:
                        layer.implementation = implementation
                        fwd, fb = (_median_ms(t, args.reps) for t in _timers(layer, x, grad_out))
                        ratios_fwd.append(fwd / dense_fwd)
                        ratios_fb.append(fb / dense_fb)
                    print(
                        f"| {in_features}x{out_features}/3 | {factorization} | {rank} | {batch} "
                        f"| {dense_fwd:.3f} | {'/'.join(f'{r:.2f}' for r in ratios_fwd)} "
                        f"| {dense_fb:.3f} | {'/'.join(f'{r:.2f}' for r in ratios_fb)} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
