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
    METHODS,
    QUICK,
    calibration_inputs,
    load_digits_tensors,
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
    methods = [label for label, _, _ in METHODS]
    expected = []
    for rank in QUICK.model_ranks:
        expected += [(f, rank, m) for f in FACTORIZATIONS for m in methods]
        expected.append(("auto", f"budget {rank}", "calibrated"))
    assert [(r["factorization"], r["rank"], r["method"]) for r in rows] == expected
    for row in rows:
        assert row["accuracy_finetuned"] > 0.7, row  # 10 classes: chance is 0.1
        assert row["compression"] > 2
        assert row["fraction"] == pytest.approx(1 / row["compression"])
        calibrated = row["method"] != "data-free"
        # calibrated fits report their output errors on the calibration inputs
        assert all((e is not None) == calibrated for e in row["output_errors"]), row
        assert all(e is None or 0 <= e < 1 for e in row["output_errors"]), row

    # Calibrated conversion keeps more of what the model computes: on average over the
    # factorizations, the accuracy right after conversion is higher than data-free.
    def mean_converted(method):
        return sum(r["accuracy_converted"] for r in rows if r["method"] == method) / len(
            FACTORIZATIONS
        )

    assert mean_converted("+ sequential") > mean_converted("data-free")
    assert mean_converted("calibrated") > mean_converted("data-free")
    for row in rows:
        if row["factorization"] == "auto":
            budget = float(row["rank"].split()[1])
            assert row["fraction"] <= budget  # every parameter of this MLP is in a linear
            assert row["chosen"] and row["chosen"] in text
    # Its run time is a benchmark figure (printed by the demo), not a test: machines are shared.
    assert seconds > 0


def test_calibration_inputs_are_training_inputs():
    x_train = load_digits_tensors(QUICK.seed)[0]
    batches = calibration_inputs(x_train, QUICK)
    assert [len(b) for b in batches] == [QUICK.calibration_batch] * (
        QUICK.calibration_samples // QUICK.calibration_batch
    )
    inputs = torch.cat(batches)
    # every calibration input is a training row (never a test one)...
    assert bool((inputs[:, None, :] == x_train[None, :, :]).all(dim=2).any(dim=1).all())
    # ...and the same ones on every call
    assert torch.equal(torch.cat(calibration_inputs(x_train, QUICK)), inputs)


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
            (row["params"], row["accuracy_converted"], row["accuracy_finetuned"],
             row["output_errors"], row["chosen"])
            for row in r["compression"]["rows"]
        ] + [row["rel_error"] for row in r["from_linear"]]  # fmt: skip

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
