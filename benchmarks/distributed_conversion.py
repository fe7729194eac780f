"""Distributed conversion: ``tensorize_model`` in one process vs. shared by N processes.

The model is a stack of transformer-like blocks (4 square ``d x d`` linears and a ``d x 4d`` /
``4d x d`` pair per block: unequal fitting costs). Each configuration runs in fresh processes
(gloo, loopback, rendezvous through a file), each with ``--threads`` threads; the time is the
conversion's alone (after imports and the process group), measured on rank 0. The runs
alternate (1 process, N processes, 1, N, ...) so that a loaded machine slows both alike; the
ratio of the medians is the speed-up. The N-process model is checked bitwise against the
single-process one.

    python benchmarks/distributed_conversion.py --blocks 2 --dim 512 --processes 2 --repeats 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model(blocks: int, dim: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(dim, dim) for _ in range(4)]
        layers += [nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)]
    return nn.Sequential(*layers)


def worker(rank: int, world: int, init: str, out: str, args: argparse.Namespace) -> None:
    import torch

    import factlin

    torch.set_num_threads(args.threads)
    group = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        group = dist.group.WORLD
        dist.barrier()
    model = build_model(args.blocks, args.dim)
    tic, cpu = time.perf_counter(), time.process_time()
    converted, report = factlin.tensorize_model(
        model, rank=args.rank, factorization=args.factorization, progress=False,
        process_group=group,
    )  # fmt: skip
    seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
    digest = hashlib.sha256()
    for key, value in converted.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    Path(f"{out}.{rank}").write_text(json.dumps({
        "seconds": seconds, "cpu": cpu, "digest": digest.hexdigest(),
        "layers": len(report.converted), "fit_seconds": [r.seconds for r in report.converted],
    }))  # fmt: skip
    if world > 1:
        torch.distributed.destroy_process_group()


def run(world: int, args: argparse.Namespace, directory: Path, tag: str) -> dict:
    out = directory / f"{tag}.json"
    init = f"file://{directory / (tag + '.rendezvous')}"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, __file__, "--worker", "--init", init, "--out", str(out),
               "--world", str(world)] + sys.argv[1:]  # fmt: skip
    processes = [
        subprocess.Popen(command + ["--process-rank", str(r)], env=env) for r in range(world)
    ]
    for process in processes:
        if process.wait(timeout=3600) != 0:
            raise SystemExit(f"a worker failed ({tag})")
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    result = dict(ranks[0])
    result["cpu"] = max(r["cpu"] for r in ranks)  # the busiest rank's CPU time
    result["digests"] = {r["digest"] for r in ranks}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rank", type=float, default=0.05, help="rank as a parameter fraction")
    parser.add_argument("--factorization", default="cp")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    known = parser.parse_args()
    if known.worker:
        worker(known.process_rank, known.world, known.init, known.out, known)
        return
    times: dict[int, list[float]] = {1: [], known.processes: []}
    cpu: dict[int, list[float]] = {1: [], known.processes: []}
    digests: set = set()
    fit_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(known.repeats):
            for world in (1, known.processes):
                result = run(world, known, Path(tmp), f"r{repeat}-w{world}")
                times[world].append(result["seconds"])
                cpu[world].append(result["cpu"])
                digests |= result["digests"]
                if world == 1:
                    fit_seconds = result["fit_seconds"]
                print(f"repeat {repeat}: {world} process(es): {result['seconds']:.1f} s wall, "
                      f"busiest process {result['cpu']:.1f} s CPU ({result['layers']} layers, "
                      f"fits summed {sum(result['fit_seconds']):.1f} s)", flush=True)  # fmt: skip
    one, many = statistics.median(times[1]), statistics.median(times[known.processes])
    cpu_one, cpu_many = statistics.median(cpu[1]), statistics.median(cpu[known.processes])
    # what the cost-estimate split gives with the single process's measured fit times
    from factlin.distributed import assign_layers, estimate_fit_flops
    from factlin.tensorized_shape import get_tensorized_shape

    costs = []
    for layer in build_model(known.blocks, known.dim):
        in_shape, out_shape = get_tensorized_shape(layer.in_features, layer.out_features, order=3)
        costs.append(estimate_fit_flops(known.factorization, known.rank, in_shape, out_shape))
    owners = assign_layers(costs, known.processes)
    loads = [sum(s for s, o in zip(fit_seconds, owners) if o == r) for r in range(known.processes)]
    print(f"{known.factorization} rank {known.rank}, {known.blocks} blocks of dim {known.dim}, "
          f"{known.threads} thread(s) per process: 1 process {one:.1f} s, "
          f"{known.processes} processes {many:.1f} s, speed-up {one / many:.2f}x (wall); "
          f"busiest process CPU {cpu_one:.1f} s vs {cpu_many:.1f} s: {cpu_one / cpu_many:.2f}x; "
          f"split of the measured fit times {[round(x, 1) for x in loads]}: at best "
          f"{sum(loads) / max(loads):.2f}x; models bitwise equal: {len(digests) == 1}")  # fmt: skip


if __name__ == "__main__":
    main()
