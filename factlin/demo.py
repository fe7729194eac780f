"""The demo behind ``make demo`` / ``python -m factlin demo``: three short, seeded experiments.

1. **Layers** -- a 768 -> 3072 layer in every factorization at a few ranks: resolved ranks,
   parameters, agreement of the factorized and reconstructed forwards, forward times.
2. **from_linear** -- a trained-looking 768 x 768 weight (decaying spectrum) compressed to a
   quarter of its parameters by each decomposition: relative error and time.
3. **Model compression** -- a dense MLP trained on scikit-learn's digits, compressed with
   :func:`factlin.convert.tensorize_model` data-free and calibrated (on a few batches of training
   inputs; also sequentially, and with ``factorization='auto'`` under a budget), then fine-tuned
   for a few epochs: test accuracy right after conversion and after fine-tuning.

Everything is seeded and runs on a fixed number of threads, so every number but the timings is
the same from run to run. scikit-learn and matplotlib are imported only inside the functions
that need them (``import factlin`` stays light).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, TextIO

import torch
from torch import nn

from .convert import tensorize_model
from .layer import FactorizedLinear
from .tensorized_shape import get_tensorized_shape

__all__ = [
    "DemoConfig",
    "FULL",
    "QUICK",
    "median_seconds",
    "run_demo",
    "demo_layers",
    "demo_from_linear",
    "demo_compression",
    "calibration_inputs",
    "load_digits_tensors",
    "plot_compression",
]

FACTORIZATIONS = ("cp", "tucker", "tt")

#: Forward implementation of the compressed models in section 3. CP uses 'reconstructed': at
#: these ranks its factorized forward is several times slower than the FLOP-based cost model
#: behind 'auto' predicts, which made CP fine-tuning take most of the demo's time.
MODEL_IMPLEMENTATION = {"cp": "reconstructed", "tucker": "auto", "tt": "auto"}

#: Conversion methods of section 3, in row order: (label, calibrated, sequential).
METHODS = (
    ("data-free", False, False),
    ("calibrated", True, False),
    ("+ sequential", True, True),
)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of one demo run (see :data:`FULL` and :data:`QUICK`)."""

    layer_features: tuple[int, int]  # (in, out) of section 1
    layer_ranks: tuple[Any, ...]
    batch: int
    repeats: int  # timing: median of up to this many runs...
    timing_budget_s: float  # ...that fit in this many seconds per measurement
    weight_size: int  # section 2: the square weight
    weight_rank: float
    hidden: int  # section 3: MLP 64 -> hidden -> hidden -> 10
    epochs: int
    finetune_epochs: int
    model_ranks: tuple[float, ...]  # also the budgets of the factorization='auto' rows
    cp_sweeps: int  # CP-ALS sweeps (n_iter_max); CP is by far the slowest decomposition
    cp_refine_iters: int  # calibrated CP: refinement iterations (calibration_kwargs n_iter_max)
    refine_iters: Optional[int]  # the same for Tucker, TT and 'auto' (None: the default)
    calibration_samples: int  # section 3: training inputs the calibrated conversions see...
    calibration_batch: int  # ...in batches of this many
    search_shapes: bool  # section 3: tensorize_model's folding search (False: balanced shapes)
    threads: int = 1
    seed: int = 0


#: What ``make demo`` runs (about a minute on two cores).
FULL = DemoConfig(
    layer_features=(768, 3072),
    layer_ranks=("same", 0.5, 0.1),
    batch=64,
    repeats=9,
    timing_budget_s=0.5,
    weight_size=768,
    weight_rank=0.25,
    hidden=512,
    epochs=15,
    finetune_epochs=3,
    model_ranks=(0.1,),
    cp_sweeps=3,
    cp_refine_iters=10,
    refine_iters=None,
    calibration_samples=512,
    calibration_batch=128,
    search_shapes=False,
)

#: A small version for tests and ``--quick`` (a few seconds).
QUICK = DemoConfig(
    layer_features=(64, 256),
    layer_ranks=("same", 0.1),
    batch=16,
    repeats=3,
    timing_budget_s=0.05,
    weight_size=64,
    weight_rank=0.25,
    hidden=64,
    epochs=15,
    finetune_epochs=1,
    model_ranks=(0.25,),
    cp_sweeps=5,
    cp_refine_iters=5,
    refine_iters=5,
    calibration_samples=256,
    calibration_batch=128,
    search_shapes=False,
)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def median_seconds(fn: Callable[[], object], repeats: int = 5, budget_s: float = 1.0) -> float:
    """Median wall time of ``fn()`` over up to ``repeats`` runs fitting in about ``budget_s``.

    The first call warms up (plans, caches); when it alone exceeds the budget, it is the answer.
    """
    tic = time.perf_counter()
    fn()
    first = time.perf_counter() - tic
    if first >= budget_s or repeats <= 1:
        return first
    runs = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


@contextlib.contextmanager
def _fixed_threads(threads: int) -> Iterator[None]:
    """Run with a fixed number of intra-op threads, then restore the previous number.

    One thread by default: reductions then run in the same order on every machine, and small
    kernels do not suffer when the cores are busy with other work.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _rank(rank: Any) -> str:
    return "(" + ",".join(map(str, rank)) + ")" if isinstance(rank, tuple) else str(rank)


def _table(rows: Sequence[Sequence[str]], out: TextIO, right: Sequence[int] = ()) -> None:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(w) if k in right else cell.ljust(w)
            for k, (cell, w) in enumerate(zip(row, widths))
        ]
        print("  " + "  ".join(cells).rstrip(), file=out)
        if index == 0:
            print("  " + "-" * (sum(widths) + 2 * (len(widths) - 1)), file=out)


# --------------------------------------------------------------------------------------------
# 1. Layers
# --------------------------------------------------------------------------------------------
def demo_layers(config: DemoConfig = FULL, out: TextIO = sys.stdout) -> list[dict]:
    """Section 1: one layer in every factorization and rank; returns one dict per row."""
    in_features, out_features = config.layer_features
    in_shape, out_shape = get_tensorized_shape(in_features, out_features, order=3)
    torch.manual_seed(config.seed)
    x = torch.randn(config.batch, in_features)
    dense = nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense_s = median_seconds(lambda: dense(x), config.repeats, config.timing_budget_s)
    print(
        f"1. Layers: {in_features} -> {out_features}, tensorized {in_shape} -> {out_shape}, "
        f"batch {config.batch}",
        file=out,
    )
    print(
        f"   nn.Linear: {in_features * out_features:,} weights, forward {_ms(dense_s)}. "
        "Times are medians without autograd; 'reconstructed' rebuilds the weight on every call "
        "(inference cache off).",
        file=out,
    )
    rows = []
    for factorization in FACTORIZATIONS:
        for rank in config.layer_ranks:
            torch.manual_seed(config.seed)
            layer = FactorizedLinear(in_shape, out_shape, factorization=factorization, rank=rank)
            layer.inference_cache = False
            outputs, seconds = {}, {}
            with torch.no_grad():
                for implementation in ("factorized", "reconstructed"):
                    layer.implementation = implementation
                    tic = time.perf_counter()
                    outputs[implementation] = layer(x)
                    first = time.perf_counter() - tic
                    # a slow forward is timed once (that call); a fast one by a median
                    seconds[implementation] = (
                        first
                        if first >= config.timing_budget_s
                        else median_seconds(
                            partial(layer, x), config.repeats, config.timing_budget_s
                        )
                    )
            params = layer.weight.num_parameters()
            rows.append({
                "factorization": factorization,
                "rank": rank,
                "resolved_rank": layer.rank,
                "params": params,
                "compression": in_features * out_features / params,
                "max_abs_diff": float(
                    (outputs["factorized"] - outputs["reconstructed"]).abs().max()
                ),
                "seconds_factorized": seconds["factorized"],
                "seconds_reconstructed": seconds["reconstructed"],
                "seconds_dense": dense_s,
            })  # fmt: skip
    table = [("factorization", "rank", "resolved", "params", "compression", "max |f - r|",
              "factorized", "reconstructed", "speed-up")]  # fmt: skip
    for row in rows:
        best = min(row["seconds_factorized"], row["seconds_reconstructed"])
        table.append((
            row["factorization"],
            str(row["rank"]),
            _rank(row["resolved_rank"]),
            f"{row['params']:,}",
            f"{row['compression']:.2f}x",
            f"{row['max_abs_diff']:.1e}",
            _ms(row["seconds_factorized"]),
            _ms(row["seconds_reconstructed"]),
            f"{dense_s / best:.3g}x",
        ))  # fmt: skip
    _table(table, out, right=(3, 4, 5, 6, 7, 8))
    print("   speed-up: nn.Linear time / the faster of the two forwards.", file=out)
    return rows


# --------------------------------------------------------------------------------------------
# 2. from_linear
# --------------------------------------------------------------------------------------------
def trained_looking_linear(size: int, seed: int = 0) -> nn.Linear:
    """A square ``nn.Linear`` whose weight is ``U diag(s) V^T`` with ``s_k ~ k^-0.5``, plus 1%
    noise, scaled like ``nn.Linear``'s initialization."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    spectrum = torch.arange(1, size + 1, dtype=torch.float64).pow(-0.5)
    weight = u @ torch.diag(spectrum) @ v.T  # (size, size)
    noise = torch.randn(size, size, generator=generator, dtype=torch.float64)
    weight = weight / weight.norm() + 0.01 * noise / noise.norm()
    linear = nn.Linear(size, size)
    with torch.no_grad():
        # nn.Linear's init has mean square 1 / (3 size): Frobenius norm sqrt(size / 3)
        linear.weight.copy_(weight * math.sqrt(size / 3) / weight.norm())
        linear.bias.zero_()
    return linear


def demo_from_linear(config: DemoConfig = FULL, out: TextIO = sys.stdout) -> list[dict]:
    """Section 2: decompose one trained-looking weight with each factorization."""
    size, rank = config.weight_size, config.weight_rank
    linear = trained_looking_linear(size, config.seed)
    print(
        f"2. from_linear: a {size} x {size} weight with singular values ~ k^-0.5 (+1% noise), "
        f"rank={rank}",
        file=out,
    )
    rows = []
    for factorization in FACTORIZATIONS:
        kwargs = {"n_iter_max": config.cp_sweeps} if factorization == "cp" else {}
        tic = time.perf_counter()
        layer = FactorizedLinear.from_linear(
            linear, rank=rank, factorization=factorization, decomposition_kwargs=kwargs
        )
        seconds = time.perf_counter() - tic
        info = layer.decomposition_info or {}
        rows.append({
            "factorization": factorization,
            "resolved_rank": layer.rank,
            "params": layer.weight.num_parameters(),
            "rel_error": float(info["rel_error"]),
            "seconds": seconds,
            "note": f"{config.cp_sweeps} ALS sweeps" if factorization == "cp" else "",
        })  # fmt: skip
    table = [("factorization", "resolved rank", "params", "compression", "rel error", "time",
              "note")]  # fmt: skip
    for row in rows:
        table.append((
            row["factorization"],
            _rank(row["resolved_rank"]),
            f"{row['params']:,}",
            f"{size * size / row['params']:.2f}x",
            f"{row['rel_error']:.4f}",
            _ms(row["seconds"]),
            row["note"],
        ))  # fmt: skip
    _table(table, out, right=(2, 3, 4, 5))
    return rows


# --------------------------------------------------------------------------------------------
# 3. Model compression
# --------------------------------------------------------------------------------------------
def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits (8 x 8 images, 10 classes), standardized, split 75 / 25.

    Returns ``(x_train, y_train, x_test, y_test)`` as float32 / int64 tensors.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=seed, stratify=data.target
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    return (
        torch.tensor(x_train, dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.int64),
        torch.tensor(x_test, dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.int64),
    )


def make_mlp(hidden: int, seed: int = 0) -> nn.Sequential:
    """The dense model: ``64 -> hidden -> hidden -> 10`` with ReLUs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )  # fmt: skip


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int = 0,
    lr: float = 1e-3,
    batch: int = 64,
) -> None:
    """Adam on the cross-entropy, mini-batches in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            optimizer.zero_grad()
            loss_fn(model(x[index]), y[index]).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibration_inputs(x_train: torch.Tensor, config: DemoConfig) -> list[torch.Tensor]:
    """The calibration set of section 3: ``config.calibration_samples`` training inputs drawn
    in a seeded order, in batches of ``config.calibration_batch`` (never the test set)."""
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(x_train), generator=generator)[: config.calibration_samples]
    return [
        x_train[order[start : start + config.calibration_batch]]
        for start in range(0, len(order), config.calibration_batch)
    ]


def _chosen_formats(report: Any) -> str:
    """What ``factorization='auto'`` chose, per layer: ``'0: low rank 30, 2: kept dense'``."""
    parts = []
    for record in report.layers:
        if not record.converted:
            if "budget" in (record.skipped or ""):
                parts.append(f"{record.name}: kept dense")
            continue
        modes = len(record.in_tensorized_features or ())
        kind = "low rank" if modes == 1 else f"{record.factorization} on {modes} modes"
        parts.append(f"{record.name}: {kind} {_rank(record.rank)}")
    return ", ".join(parts)


def demo_compression(config: DemoConfig = FULL, out: TextIO = sys.stdout) -> dict:
    """Section 3: train, compress data-free and calibrated, fine-tune, evaluate.

    For every rank in ``config.model_ranks``: each factorization converted by each of
    :data:`METHODS` (data-free; calibrated on a few batches of training inputs; calibrated
    and sequential), then ``factorization='auto'`` with that rank as the parameter budget
    (calibrated). Every compressed model is evaluated right after conversion and after the
    same fine-tuning.

    Returns ``{'dense': {...}, 'calibration_samples': int, 'finetune_epochs': int, 'rows':
    [...]}``; each row holds the accuracies, parameters, errors and times of one conversion.
    """
    x_train, y_train, x_test, y_test = load_digits_tensors(config.seed)
    calibration = calibration_inputs(x_train, config)
    dense = make_mlp(config.hidden, config.seed)
    tic = time.perf_counter()
    train(dense, x_train, y_train, config.epochs, config.seed)
    train_s = time.perf_counter() - tic
    dense_acc = accuracy(dense, x_test, y_test)
    with torch.no_grad():
        dense_fwd = median_seconds(lambda: dense(x_test), config.repeats, config.timing_budget_s)
    dense_params = _params(dense)
    n_calibration = sum(len(batch) for batch in calibration)
    print(
        f"3. Model compression: MLP 64 -> {config.hidden} -> {config.hidden} -> 10 on digits "
        f"({len(x_train)} train / {len(x_test)} test)",
        file=out,
    )
    print(
        f"   dense: {dense_params:,} parameters, test accuracy {dense_acc:.3f} after "
        f"{config.epochs} epochs ({train_s:.1f} s), forward on the test set {_ms(dense_fwd)}. "
        f"Compressed models: tensorize_model (the 10-way head stays dense) data-free or "
        f"calibrated on {n_calibration} training inputs ({len(calibration)} batches), then "
        f"{_epochs(config.finetune_epochs)} of fine-tuning.",
        file=out,
    )
    runs: list[tuple[str, Any, str, dict]] = []  # (factorization, rank label, method, kwargs)
    auto_kwargs = None if config.refine_iters is None else {"n_iter_max": config.refine_iters}
    for rank in config.model_ranks:
        for factorization in FACTORIZATIONS:
            cp = factorization == "cp"
            for method, calibrated, sequential in METHODS:
                kwargs: dict[str, Any] = {
                    "rank": rank,
                    "factorization": factorization,
                    "implementation": MODEL_IMPLEMENTATION[factorization],
                    "decomposition_kwargs": {"n_iter_max": config.cp_sweeps} if cp else None,
                }
                if calibrated:
                    iters = config.cp_refine_iters if cp else config.refine_iters
                    kwargs.update(
                        calibration=calibration,
                        sequential=sequential,
                        calibration_kwargs=None if iters is None else {"n_iter_max": iters},
                    )
                runs.append((factorization, rank, method, kwargs))
        runs.append((
            "auto", f"budget {rank}", "calibrated",
            {"budget": rank, "factorization": "auto", "calibration": calibration,
             "calibration_kwargs": auto_kwargs},
        ))  # fmt: skip
    rows = []
    for factorization, rank, method, kwargs in runs:
        tic = time.perf_counter()
        model, report = tensorize_model(
            dense, progress=False, search_shapes=config.search_shapes, **kwargs
        )
        convert_s = time.perf_counter() - tic
        before = accuracy(model, x_test, y_test)
        tic = time.perf_counter()
        train(model, x_train, y_train, config.finetune_epochs, config.seed)
        finetune_s = time.perf_counter() - tic
        after = accuracy(model, x_test, y_test)
        with torch.no_grad():
            fwd = median_seconds(partial(model, x_test), config.repeats, config.timing_budget_s)
        params = _params(model)
        rows.append({
            "factorization": factorization,
            "rank": rank,
            "method": method,
            "params": params,
            "fraction": params / dense_params,
            "compression": dense_params / params,
            "accuracy_converted": before,
            "accuracy_finetuned": after,
            "rel_errors": [r.rel_error for r in report.converted],
            "output_errors": [r.output_error for r in report.converted],
            "chosen": _chosen_formats(report) if factorization == "auto" else None,
            "seconds_convert": convert_s,
            "seconds_finetune": finetune_s,
            "seconds_forward": fwd,
        })  # fmt: skip
    table = [("factorization", "rank", "method", "params", "of dense", "acc converted",
              "acc fine-tuned", "convert", "fine-tune", "forward", "vs dense")]  # fmt: skip
    for row in rows:
        table.append((
            row["factorization"],
            str(row["rank"]),
            row["method"],
            f"{row['params']:,}",
            f"{100 * row['fraction']:.1f}%",
            f"{row['accuracy_converted']:.3f}",
            f"{row['accuracy_finetuned']:.3f}",
            _ms(row["seconds_convert"]),
            _ms(row["seconds_finetune"]),
            _ms(row["seconds_forward"]),
            f"{dense_fwd / row['seconds_forward']:.3g}x",
        ))  # fmt: skip
    _table(table, out, right=(3, 4, 5, 6, 7, 8, 9, 10))
    iters = f"CP: {config.cp_sweeps} ALS sweeps, {config.cp_refine_iters} refinement iterations"
    if config.refine_iters is not None:
        iters += f"; the others {config.refine_iters}"
    for line in (
        "rank: fraction of each converted layer's dense parameters (auto: the budget, a fraction "
        "of the matched layers' parameters, the head counted dense); of dense: the whole "
        "model's parameters against the dense model's.",
        "calibrated: each layer fitted to its outputs on the calibration inputs "
        f"({iters}); + sequential: the layers fitted in call order, each on the inputs the "
        "partly compressed model gives it; convert: the whole tensorize_model call"
        + ("." if config.search_shapes else ", balanced foldings (search_shapes=False)."),
        "vs dense: forward speed-up over the dense model (inference cache on; implementation "
        "'auto', CP 'reconstructed').",
    ):
        print(f"   {line}", file=out)
    for row in rows:
        if row["chosen"] is not None:
            print(f"   auto, {row['rank']}: {row['chosen']}", file=out)
    return {
        "dense": {
            "params": dense_params,
            "accuracy": dense_acc,
            "seconds_train": train_s,
            "seconds_forward": dense_fwd,
        },
        "calibration_samples": n_calibration,
        "finetune_epochs": config.finetune_epochs,
        "rows": rows,
    }


def plot_compression(result: dict, path: str) -> None:
    """Test accuracy right after conversion and after fine-tuning, as grouped bars: one group
    per factorization and rank, one bar per conversion method (PNG etc.).

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["rows"]
    groups: list[tuple[str, str]] = []
    for row in rows:
        key = (row["factorization"], str(row["rank"]))
        if key not in groups:
            groups.append(key)
    methods = [label for label, _, _ in METHODS]
    width = 0.8 / len(methods)
    figure = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2, sharey=True)
    for axes, key, title in zip(
        panels,
        ("accuracy_converted", "accuracy_finetuned"),
        ("right after conversion", f"after {_epochs(result['finetune_epochs'])} of fine-tuning"),
    ):
        for k, method in enumerate(methods):
            xs, ys = [], []
            for g, (factorization, rank) in enumerate(groups):
                for row in rows:
                    if (row["factorization"], str(row["rank"]), row["method"]) == (
                        factorization, rank, method,
                    ):  # fmt: skip
                        xs.append(g + (k - (len(methods) - 1) / 2) * width)
                        ys.append(row[key])
            bars = axes.bar(xs, ys, width=width, label=method)
            axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        axes.axhline(result["dense"]["accuracy"], color="gray", linestyle="--", label="dense")
        axes.set_xticks(range(len(groups)))
        axes.set_xticklabels([f"{f}\n{r}" for f, r in groups])
        axes.set_ylim(0, 1.05)
        axes.set_title(f"test accuracy {title}")
    panels[0].set_ylabel("test accuracy")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.suptitle("digits MLP compressed with tensorize_model: data-free against calibrated")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path)


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------
def run_demo(quick: bool = False, plot: Optional[str] = None, out: Optional[TextIO] = None) -> dict:
    """Run the three sections and print their tables to ``out`` (stdout by default).

    Parameters
    ----------
    quick : bool, default False
        Use :data:`QUICK` (a few seconds) instead of :data:`FULL` (about a minute).
    plot : str, optional
        Save the figure of section 3 (accuracy after conversion and after fine-tuning, per
        factorization and method) there (needs matplotlib).
    out : text stream, optional

    Returns
    -------
    dict
        ``{'layers': [...], 'from_linear': [...], 'compression': {...}, 'seconds': float}``.
    """
    out = sys.stdout if out is None else out
    config = QUICK if quick else FULL
    tic = time.perf_counter()
    with _fixed_threads(config.threads):
        print(
            f"factlin demo ({'quick' if quick else 'full'}; torch {torch.__version__}, "
            f"{config.threads} thread{'s' if config.threads != 1 else ''}, seed {config.seed})",
            file=out,
        )
        print(file=out)
        layers = demo_layers(config, out)
        print(file=out)
        from_linear = demo_from_linear(config, out)
        print(file=out)
        compression = demo_compression(config, out)
    if plot is not None:
        plot_compression(compression, plot)
        print(f"\nplot saved to {plot}", file=out)
    seconds = time.perf_counter() - tic
    print(f"\ndemo finished in {seconds:.1f} s", file=out)
    return {
        "layers": layers,
        "from_linear": from_linear,
        "compression": compression,
        "seconds": seconds,
    }
