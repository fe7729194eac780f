"""tensorize_model with calibration: statistics, sequential fitting, budget allocation by output
error, refinement, and their bad inputs (factlin/convert.py, factlin/_calibrated_conversion.py,
factlin/allocation.py, factlin/refine.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from factlin import (
    CalibrationError,
    FactorizedLinear,
    collect_input_stats,
    tensorize_model,
)
from factlin.allocation import Option, allocate


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 16)
    )


def _batches(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=g) * torch.logspace(0, -2, 24)
    return [torch.randn(32, 24, generator=g) @ mix + 0.3 for _ in range(n)]


def _output_error(model: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> float:
    x = torch.cat(batches)
    with torch.no_grad():
        y, ref = model(x), reference(x)
    return float((y - ref).norm() / (ref - ref.mean(0)).norm())


@pytest.mark.parametrize("factorization", ["tucker", "tt", "cp"])
def test_calibrated_layers_beat_their_data_free_fit(factorization):
    model, batches = _model(), _batches()
    kwargs = {"decomposition_kwargs": {"n_iter_max": 15}} if factorization == "cp" else {}
    small, report = tensorize_model(
        model, rank=0.3, factorization=factorization, calibration=batches, progress=False,
        n_tensorized_modes=2, search_shapes=False, **kwargs,
    )  # fmt: skip
    converted = report.converted
    assert len(converted) == 3
    for record in converted:
        assert record.output_error is not None and record.output_error_data_free is not None
        assert record.output_error <= record.output_error_data_free + 1e-9
        assert isinstance(small.get_submodule(record.name), FactorizedLinear)
    plain, _ = tensorize_model(
        model, rank=0.3, factorization=factorization, progress=False, n_tensorized_modes=2,
        search_shapes=False, **kwargs,
    )  # fmt: skip
    assert _output_error(small, model, batches) < _output_error(plain, model, batches)
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.GELU))


def test_precomputed_statistics_give_the_same_model():
    model, batches = _model(), _batches()
    stats = collect_input_stats(model, batches)
    a, _ = tensorize_model(model, rank=0.3, factorization="tt", calibration=batches,
                           progress=False, search_shapes=False)  # fmt: skip
    b, _ = tensorize_model(model, rank=0.3, factorization="tt", calibration=stats,
                           progress=False, search_shapes=False)  # fmt: skip
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key])


def test_one_shot_iterator_is_read_once_for_sequential():
    model, batches = _model(), _batches()
    small, report = tensorize_model(
        model, rank=0.3, factorization="tt", calibration=iter(batches), sequential=True,
        progress=False, search_shapes=False,
    )  # fmt: skip
    assert len(report.converted) == 3
    assert all(r.output_error is not None for r in report.converted)


class _Reversed(nn.Module):
    """Calls its layers in the reverse of their registration order."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(32, 16)
        self.middle = nn.Linear(32, 32)
        self.first = nn.Linear(24, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def test_sequential_follows_the_call_order_and_keeps_the_first_layer_fit():
    torch.manual_seed(0)
    model, batches = _Reversed(), _batches()
    seq, seq_report = tensorize_model(
        model, rank=0.3, factorization="tucker", calibration=batches, sequential=True,
        progress=False, search_shapes=False, n_tensorized_modes=2,
    )  # fmt: skip
    one, _ = tensorize_model(
        model, rank=0.3, factorization="tucker", calibration=batches, progress=False,
        search_shapes=False, n_tensorized_modes=2,
    )  # fmt: skip
    # the first layer called sees the same inputs either way: the same fit
    for key, value in one.first.state_dict().items():
        torch.testing.assert_close(value, seq.first.state_dict()[key])
    assert all(r.output_error is not None for r in seq_report.converted)
    with torch.no_grad():
        assert torch.isfinite(seq(torch.cat(batches))).all()


def test_sequential_inplace_failure_leaves_the_model_as_it_was(monkeypatch):
    model, batches = _model(), _batches()
    before = copy.deepcopy(model.state_dict())
    modules = list(model)
    calls = {"n": 0}
    original = FactorizedLinear.from_linear.__func__

    def failing(cls, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise TypeError("boom")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(FactorizedLinear, "from_linear", classmethod(failing))
    with pytest.raises(TypeError, match="boom"):
        tensorize_model(model, rank=0.3, factorization="tt", calibration=batches,
                        sequential=True, inplace=True, progress=False)  # fmt: skip
    assert list(model) == modules
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize("factorization", ["tt", "auto"])
def test_budget_by_output_error_stays_within_budget(factorization):
    model, batches = _model(), _batches()
    small, report = tensorize_model(
        model, budget=0.4, factorization=factorization, calibration=batches, progress=False,
        n_tensorized_modes=2,
    )  # fmt: skip
    assert report.params_after <= 0.4 * report.params_before * (1 + 1e-9)
    assert report.params_after > 0.2 * report.params_before  # the budget is used, not wasted
    for record in report.converted:
        assert record.factorization in ("cp", "tucker", "tt")
        assert record.output_error is not None
    if factorization == "tt":
        assert {r.factorization for r in report.converted} == {"tt"}
    with torch.no_grad():
        assert small(torch.cat(batches)).shape == (192, 16)


def test_allocation_prefers_the_better_layer_and_respects_the_budget():
    cheap = [Option(None, None, None, None, 100, 0.0), Option("tt", (2,), (2,), 1, 10, 0.9),
             Option("tt", (2,), (2,), 2, 20, 0.1)]  # fmt: skip
    costly = [Option(None, None, None, None, 100, 0.0), Option("tt", (2,), (2,), 1, 10, 0.5),
              Option("tt", (2,), (2,), 2, 20, 0.45)]  # fmt: skip
    chosen = allocate([cheap, costly], 30)
    assert [o.params for o in chosen] == [20, 10]  # 0.8 error saved for 10 params beats 0.05
    with pytest.raises(ValueError, match="budget"):
        allocate([cheap, costly], 15)


def test_refinement_lowers_the_distillation_loss():
    model, batches = _model(), _batches()
    small, report = tensorize_model(
        model, rank=0.3, factorization="tt", calibration=batches, refine_steps=30,
        refine_lr=1e-3, progress=False, search_shapes=False,
    )  # fmt: skip
    refinement = report.refinement
    assert refinement is not None and refinement["steps"] == 30
    assert refinement["loss_after"] <= refinement["loss_before"]
    assert "refinement" in str(report)
    assert report.to_dict()["refinement"] == refinement


def test_layers_no_batch_reaches_are_fitted_data_free():
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(24, 24)
            self.unused = nn.Linear(24, 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    small, report = tensorize_model(Partial(), rank=0.3, factorization="tt",
                                    calibration=_batches(), progress=False)  # fmt: skip
    assert report["unused"].converted and report["unused"].output_error is None
    assert "data-free" in report["unused"].note
    assert report["used"].output_error is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"sequential": True}, ValueError, "calibration"),
        ({"factorization": "auto", "rank": 0.3}, ValueError, "budget"),
        ({"calibration": b"text"}, TypeError, "iterable of batches"),
        ({"calibration": 3}, TypeError, "iterable of batches"),
        ({"calibration": []}, CalibrationError, "empty"),
        ({"refine_steps": 5}, ValueError, "calibration"),
        ({"refine_steps": -1, "calibration": None}, ValueError, "refine_steps"),
        ({"refine_lr": 0.0}, ValueError, "refine_lr"),
        ({"sequential": "yes"}, TypeError, "sequential"),
        ({"tolerance": 0.5, "factorization": "tt"}, ValueError, "tolerance"),
        ({"calibration_kwargs": {"bogus": 1}, "calibration": "batches"}, TypeError, "bogus"),
        ({"calibration_kwargs": {"damping": 0.1}}, TypeError, "pass calibration"),
    ],
)
def test_bad_arguments_raise_before_any_work(kwargs, error, message):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("calibration"), str) and kwargs["calibration"] == "batches":
        kwargs["calibration"] = _batches(2)
    if "calibration" not in kwargs and kwargs.get("tolerance") is not None:
        kwargs["calibration"] = _batches(2)
    kwargs.setdefault("rank", 0.3) if "budget" not in kwargs else None
    if kwargs.get("calibration", 0) is None:
        del kwargs["calibration"]
    with pytest.raises(error, match=message):
        tensorize_model(model, progress=False, **kwargs)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_a_batch_the_model_rejects_names_its_index_and_changes_nothing():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    batches = _batches(3) + [torch.randn(4, 7)]
    with pytest.raises(ValueError, match="batch 3.*in_features is 24"):
        tensorize_model(model, rank=0.3, factorization="tt", calibration=batches, inplace=True,
                        progress=False)  # fmt: skip
    assert all(not m._forward_pre_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_from_linear_refuses_calibration_kwargs_without_calibration():
    with pytest.raises(TypeError, match="pass calibration"):
        FactorizedLinear.from_linear(nn.Linear(16, 16), rank=0.3, calibration_kwargs={"tol": 0.1})


def test_a_single_mapping_is_one_batch_not_its_keys():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(24, 24)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.fc(x * scale)

    batch = {"x": _batches(1)[0], "scale": 2.0}
    stats = collect_input_stats(Keyword(), batch)
    assert stats["fc"].count == 32
    torch.testing.assert_close(stats["fc"].mean, (2.0 * batch["x"]).double().mean(0))
