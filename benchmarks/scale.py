"""Conversion time and peak memory of ``FactorizedLinear.from_linear`` at LLM-layer scale.

For Gaussian weights (``torch.randn``, seed 0) of 1024x1024, 2048x2048, 4096x4096, 4096x11008
and 8192x8192 (when the host has the memory), every format (TT, Tucker, CP) at ranks 0.05 and
0.25 of the dense parameter count is converted with the public API, each configuration in a
fresh subprocess, next to the algorithm's FLOP count and to ``torch.svd_lowrank(W, q=256,
niter=2)`` of the same matrix (the practical floor: one randomized SVD). Shapes are the
default ``get_tensorized_shape`` ones (``search_shapes=False`` where ``from_linear`` has it:
the search runs one decomposition per candidate shape).

Memory method: the child process first runs the same conversion on a 128x128 weight (so that
code pages and thread pools loaded on first use are not counted), builds the weight in place
(``normal_``, no temporary), reads its resident set size (``/proc/self/statm``) and then calls
the conversion; the peak extra
memory is ``ru_maxrss`` (the process's high-water mark, ``resource.getrusage``) after the call
minus that resident size. It includes everything the conversion allocates (working copies,
Gram matrices, the new layer's parameters), is exact when nothing larger than the weight was
freed before the call (the child checks: ``ru_maxrss`` before the call is reported as
``hw0``), and an upper bound otherwise.

FLOP models (the work each algorithm has to do, the time it should follow):

* TT-SVD: per split of an ``m x n`` unfolding into rank ``r``: the Gram matrix of the smaller
  side, ``2 m n min(m, n)``, and the projection, ``2 m n r``.
* Tucker: the HOSVD Grams, ``2 n_k N`` per mode, then per HOOI sweep the partial projections
  of the dimension tree (``2 |Y| r_k`` per mode product) and a Gram per mode (``2 n_k |Y|``),
  times the sweeps run.
* CP-ALS: the initial Grams (``2 n_k N`` per mode), then per sweep a matricized-tensor times
  Khatri-Rao product per mode, ``2 N R``, times the sweeps run.
* ``svd_lowrank``: ``2 m n q (2 niter + 2)``.

``--compare DIR`` also runs TT and Tucker from another copy of the package (for example
``git archive <commit> factlin | tar -x -C DIR``), interleaved with the current one
configuration by configuration, so that both see the same machine load.

Usage: ``python benchmarks/scale.py [--sizes 1024x1024,...] [--formats tt,tucker,cp]``
``[--ranks 0.05,0.25] [--threads 1] [--cp-sweeps 2] [--compare DIR] [--json PATH]``
``[--plot benchmarks/scale.png]``
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import time

DEFAULT_SIZES = "1024x1024,2048x2048,4096x4096,4096x11008,8192x8192"
SVD_LOWRANK_Q = 256
SVD_LOWRANK_NITER = 2
#: A configuration is skipped when the host has less than this multiple of the weight's bytes
#: available (the conversion's own guard would refuse it anyway).
MEMORY_HEADROOM = 8
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ------------------------------------------------------------------------------ FLOP models
def tt_flops(out_shape: tuple[int, ...], in_shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    sizes = [o * i for o, i in zip(out_shape, in_shape)]
    total, bond = 0, 1
    for k in range(len(sizes) - 1):
        rows, cols = bond * sizes[k], math.prod(sizes[k + 1 :])
        total += 2 * rows * cols * min(rows, cols) + 2 * rows * cols * ranks[k + 1]
        bond = ranks[k + 1]
    return total


def tucker_flops(shape: tuple[int, ...], ranks: tuple[int, ...], sweeps: int) -> int:
    numel = math.prod(shape)
    hosvd = sum(2 * n * numel for n in shape)

    def project(sizes: list[int], modes: list[int]) -> tuple[int, list[int]]:
        cost, sizes = 0, list(sizes)
        for k in sorted(modes, key=lambda k: ranks[k] / shape[k]):
            cost += 2 * math.prod(sizes) * ranks[k]
            sizes[k] = ranks[k]
        return cost, sizes

    def sweep(sizes: list[int], modes: list[int], want_core: bool) -> int:
        if len(modes) == 1:
            k = modes[0]
            return 2 * sizes[k] * math.prod(sizes) + (
                2 * math.prod(sizes) * ranks[k] if want_core else 0
            )
        half = len(modes) // 2
        first, second = modes[:half], modes[half:]
        c1, y1 = project(sizes, second)
        c2, y2 = project(sizes, first)
        return c1 + sweep(y1, first, False) + c2 + sweep(y2, second, want_core)

    return hosvd + sweeps * sweep(list(shape), list(range(len(shape))), True)


def cp_flops(shape: tuple[int, ...], rank: int, sweeps: int) -> int:
    numel = math.prod(shape)
    return sum(2 * n * numel for n in shape) + sweeps * len(shape) * 2 * numel * rank


def svd_lowrank_flops(out_features: int, in_features: int) -> int:
    return 2 * out_features * in_features * SVD_LOWRANK_Q * (2 * SVD_LOWRANK_NITER + 2)


# --------------------------------------------------------------------------- child process
def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _options(factlin) -> dict:  # noqa: ANN001
    """``search_shapes=False`` where ``from_linear`` has it: one decomposition per layer."""
    if "search_shapes" in inspect.signature(factlin.FactorizedLinear.from_linear).parameters:
        return {"search_shapes": False}
    return {}


def _warm_up(config: dict, torch, nn, factlin) -> None:  # noqa: ANN001
    """The same call on a 128x128 weight first, so that code pages and thread pools loaded on
    first use are not counted as the conversion's memory."""
    weight = torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    if config["format"] == "svd_lowrank":
        torch.svd_lowrank(weight, q=16, niter=SVD_LOWRANK_NITER)
        return
    linear = nn.Linear(128, 128, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    kwargs = {"n_iter_max": 1} if config["format"] == "cp" else None
    factlin.FactorizedLinear.from_linear(
        linear,
        rank=config["rank"],
        factorization=config["format"],
        decomposition_kwargs=kwargs,
        **_options(factlin),
    )


def child(config: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    if config.get("source"):
        sys.path.insert(0, config["source"])
    import torch
    from torch import nn

    import factlin

    torch.set_num_threads(config["threads"])
    _warm_up(config, torch, nn, factlin)
    out_features, in_features = config["size"]
    weight = torch.empty(out_features, in_features)
    weight.normal_(generator=torch.Generator().manual_seed(0))  # in place: no temporary
    row = {"weight_bytes": weight.numel() * weight.element_size()}
    rss0, hw0 = _rss_bytes(), _max_rss_bytes()
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    if config["format"] == "svd_lowrank":
        _, s, _ = torch.svd_lowrank(weight, q=SVD_LOWRANK_Q, niter=SVD_LOWRANK_NITER)
        row["seconds"] = time.perf_counter() - start
        row["cpu_seconds"] = _cpu_seconds() - cpu0
        norm_sq = float(weight.double().square().sum())
        row["rel_error"] = math.sqrt(max(0.0, 1 - float(s.double().square().sum()) / norm_sq))
        row["flops"] = svd_lowrank_flops(out_features, in_features)
    else:
        linear = nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        kwargs = {"n_iter_max": config["cp_sweeps"]} if config["format"] == "cp" else None
        options = _options(factlin)
        try:
            layer = factlin.FactorizedLinear.from_linear(
                linear,
                rank=config["rank"],
                factorization=config["format"],
                decomposition_kwargs=kwargs,
                **options,
            )
        except ValueError as error:  # a guard refused it: record why, at once
            row["seconds"] = time.perf_counter() - start
            row["cpu_seconds"] = _cpu_seconds() - cpu0
            row["refused"] = str(error).splitlines()[0][:300]
            return row
        row["seconds"] = time.perf_counter() - start
        row["cpu_seconds"] = _cpu_seconds() - cpu0
        info = layer.decomposition_info or {}
        row["rel_error"] = float(info.get("rel_error", float("nan")))
        rank = layer.weight.rank
        row["rank_spec"] = rank if isinstance(rank, int) else list(rank)
        outs, ins = layer.out_tensorized_features, layer.in_tensorized_features
        if config["format"] == "tt":
            row["flops"] = tt_flops(tuple(outs), tuple(ins), tuple(rank))
        elif config["format"] == "tucker":
            row["n_iter"] = int(info.get("n_iter", 0))
            row["flops"] = tucker_flops((*outs, *ins), tuple(rank), row["n_iter"])
        else:
            row["n_iter"] = int(info.get("n_iter", 0))
            row["flops"] = cp_flops((*outs, *ins), int(rank), row["n_iter"])
        row["params"] = sum(p.numel() for p in layer.parameters())
    row["peak_extra_bytes"] = _max_rss_bytes() - rss0
    row["high_water_before_bytes"] = hw0 - rss0
    return row


# -------------------------------------------------------------------------------- driver
def _available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return sys.maxsize


def run_config(config: dict, timeout: float) -> dict:
    out_features, in_features = config["size"]
    need = MEMORY_HEADROOM * 4 * out_features * in_features
    if _available_bytes() < need:
        return {"skipped": f"needs ~{need / 2**30:.1f} GiB available"}
    try:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"skipped": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size_key(size: list[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _time(result: dict) -> float:
    """CPU seconds when measured (one thread: the time alone, robust to a loaded machine),
    else wall seconds."""
    return float(result.get("cpu_seconds", result["seconds"]))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| layer | format | rank | GFLOP | CPU s (wall s) | GFLOP/s | peak extra (x weight) | "
        "rel. error | before: CPU s (wall s) / peak / error | speed-up |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        new = row["result"]
        old = row.get("before")
        label = _size_key(row["size"])
        rank = "" if row["format"] == "svd_lowrank" else f"{row['rank']:g}"
        fmt = row["format"]
        if fmt == "svd_lowrank":
            fmt = f"svd_lowrank q={SVD_LOWRANK_Q}"
        elif "n_iter" in new:
            fmt = f"{fmt} ({new['n_iter']} sweeps)"
        if "skipped" in new or "refused" in new:
            why = new.get("skipped") or f"refused in {new['seconds']:.2f} s: {new['refused']}"
            lines.append(f"| {label} | {fmt} | {rank} | | | | | | {why} | |")
            continue
        gflop = new["flops"] / 1e9
        before, speedup = "", ""
        if old is not None and "seconds" in old and "refused" not in old:
            before = (
                f"{_time(old):.2f} ({old['seconds']:.2f}) / "
                f"{old['peak_extra_bytes'] / old['weight_bytes']:.2f} / {old['rel_error']:.4f}"
            )
            speedup = f"{_time(old) / _time(new):.1f}x"
        elif old is not None:
            before = old.get("skipped", old.get("refused", ""))
        lines.append(
            f"| {label} | {fmt} | {rank} | {gflop:.1f} | {_time(new):.2f} ({new['seconds']:.2f}) "
            f"| {gflop / _time(new):.1f} | {new['peak_extra_bytes'] / new['weight_bytes']:.2f} "
            f"| {new['rel_error']:.4f} | {before} | {speedup} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        new = row["result"]
        if "seconds" not in new or "refused" in new:
            continue
        name = (
            row["format"] if row["format"] == "svd_lowrank" else f"{row['format']} {row['rank']:g}"
        )
        numel = row["size"][0] * row["size"][1]
        series.setdefault(name, []).append((numel, _time(new), new["flops"]))
        old = row.get("before")
        if old is not None and "seconds" in old:
            series.setdefault(name + " (before)", []).append((numel, _time(old), new["flops"]))
    bases = sorted({name.replace(" (before)", "") for name in series})
    colors = {base: f"C{k}" for k, base in enumerate(bases)}
    colors["svd_lowrank"] = "black"
    for name, points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        before = "before" in name
        style = {
            "color": colors[name.replace(" (before)", "")],
            "linestyle": "--" if before else (":" if name == "svd_lowrank" else "-"),
            "marker": "x" if before else "o",
            "label": name,
        }
        ax_time.plot(xs, [p[1] for p in points], **style)
        if not before:
            ax_rate.plot([p[2] / 1e9 for p in points], [p[1] for p in points], **style)
    ax_time.set(
        xscale="log",
        yscale="log",
        xlabel="weight elements",
        ylabel="CPU seconds (1 thread)",
        title="conversion time against layer size",
    )
    ax_rate.set(
        xscale="log",
        yscale="log",
        xlabel="GFLOP (algorithm's model)",
        ylabel="CPU seconds (1 thread)",
        title="time against FLOPs (slope 1 = follows the FLOPs)",
    )
    for ax in (ax_time, ax_rate):
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=7, ncol=2)
    ax_rate.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=DEFAULT_SIZES)
    parser.add_argument("--formats", default="tt,tucker,cp")
    parser.add_argument("--ranks", default="0.05,0.25")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cp-sweeps", type=int, default=2, help="CP sweeps (n_iter_max)")
    parser.add_argument("--source", help="import factlin from this copy (default: installed)")
    parser.add_argument("--compare", help="another copy of the package for TT/Tucker 'before'")
    parser.add_argument(
        "--compare-max-elements", type=int, help="run 'before' only up to this weight size"
    )
    parser.add_argument(
        "--cp-max-elements",
        type=int,
        help="CP only up to this weight size (larger: not run, noted); refusals are instant",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--from-json", help="only render the table/plot of a saved run")
    parser.add_argument("--plot", help="write the log-log plot here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as handle:
            rows = json.load(handle)
    else:
        rows = []
        sizes = [[int(v) for v in s.split("x")] for s in args.sizes.split(",")]
        for size in sizes:
            base = {
                "size": size,
                "threads": args.threads,
                "cp_sweeps": args.cp_sweeps,
                "source": args.source,
            }
            configs = [{**base, "format": "svd_lowrank", "rank": 0.0}]
            for fmt in args.formats.split(","):
                for rank in (float(r) for r in args.ranks.split(",")):
                    configs.append({**base, "format": fmt, "rank": rank})
            numel = size[0] * size[1]
            for config in configs:
                if config["format"] == "cp" and numel > (args.cp_max_elements or numel):
                    rows.append({**config, "result": {"skipped": "not run (--cp-max-elements)"}})
                    continue
                row = {**config, "result": run_config(config, args.timeout)}
                compare = args.compare and numel <= (args.compare_max_elements or numel)
                if compare and config["format"] in ("tt", "tucker"):
                    row["before"] = run_config({**config, "source": args.compare}, args.timeout)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.json:
                    with open(args.json, "w", encoding="utf-8") as handle:
                        json.dump(rows, handle, indent=1)
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
