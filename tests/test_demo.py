"""Tests of factlin/demo.py: the demo pipeline in its quick version."""

from __future__ import annotations

import io
import time

import pytest
import torch

# The demo's data set and plot come from the `demo` extra (`make test` installs it).
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from factlin.demo import (  # noqa: E402
    FACTORIZATIONS,
    QUICK,
    median_seconds,
    plot_compression,
    run_demo,
    trained_looking_linear,
)


@pytest.fixture(scope="module")
def quick_run():
    out = io.StringIO()
    tic = time.perf_counter()
    result = run_demo(quick=True, out=out)
    return result, out.getvalue(), time.perf_counter() - tic


def test_quick_demo_accuracy(quick_run):
    result, text, seconds = quick_run
    compression = result["compression"]
    assert compression["dense"]["accuracy"] > 0.9
    rows = compression["rows"]
    assert [r["factorization"] for r in rows] == [
        f for f in FACTORIZATIONS for _ in QUICK.model_ranks
    ]
    for row in rows:
        assert row["accuracy_finetuned"] > 0.8, row
        assert row["compression"] > 2
    # Its run time is a benchmark figure (printed by the demo), not a test: machines are shared.
    assert seconds > 0


def test_quick_demo_output(quick_run):
    result, text, _ = quick_run
    for header in ("1. Layers", "2. from_linear", "3. Model compression", "demo finished"):
        assert header in text
    for row in result["layers"]:
        assert row["max_abs_diff"] < 1e-4  # factorized and reconstructed forwards agree
        assert row["seconds_factorized"] > 0 and row["seconds_reconstructed"] > 0
    for row in result["from_linear"]:
        assert 0 < row["rel_error"] < 1


def test_demo_is_reproducible(quick_run):
    result, _, _ = quick_run
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = run_demo(quick=True, out=io.StringIO())
        assert torch.get_num_threads() == 2  # the demo's thread setting is undone
    finally:
        torch.set_num_threads(threads)

    def numbers(r):
        return [
            (row["params"], row["accuracy_converted"], row["accuracy_finetuned"])
            for row in r["compression"]["rows"]
        ] + [row["rel_error"] for row in r["from_linear"]]

    assert numbers(again) == numbers(result)


def test_plot(quick_run, tmp_path):
    result, _, _ = quick_run
    path = tmp_path / "demo.png"
    plot_compression(result["compression"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_looking_linear_spectrum():
    linear = trained_looking_linear(48)
    singular = torch.linalg.svdvals(linear.weight.double())
    assert singular[0] / singular[15] > 3  # decaying
    assert linear.weight.pow(2).mean().item() == pytest.approx(1 / (3 * 48), rel=1e-5)


def test_median_seconds():
    calls = []
    assert median_seconds(lambda: calls.append(1), repeats=3, budget_s=1.0) >= 0
    assert len(calls) == 4  # one warm-up, three timed
