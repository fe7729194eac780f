"""Tests for factlin/calibration.py: collect_input_stats, run_batch, calibration_batches,
call_order, collect_paired_stats."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _close import assert_close
from torch import nn

from factlin.calibration import (
    CalibrationError,
    calibration_batches,
    call_order,
    collect_input_stats,
    collect_paired_stats,
    run_batch,
)
from factlin.input_stats import InputStats


class Block(nn.Module):
    """Two branches, a shared linear called twice per forward, a keyword argument, a linear
    that is never called, and dropout (so eval mode matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 8))
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(5, 5)
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0, *, shift: float = 0.0) -> torch.Tensor:
        self.calls += 1
        h = self.enc(x) * scale + shift
        h = self.shared(torch.relu(self.shared(h)))
        return self.head(h)


def _record_inputs(model: nn.Module, batches, call) -> dict[str, list[torch.Tensor]]:
    """A manual reference: every linear's inputs over ``batches``, in eval mode."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            seen[name] = []

            def hook(mod, args, name=name):
                seen[name].append(args[0].detach().clone())

            handles.append(module.register_forward_pre_hook(hook))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        for batch in batches:
            call(model, batch)
    for handle in handles:
        handle.remove()
    for module, flag in flags:
        module.training = flag
    return seen


def _check_against(stats: dict[str, InputStats], seen: dict[str, list[torch.Tensor]]) -> None:
    for name, s in stats.items():
        if not seen[name]:
            assert s.count == 0
            continue
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[name]]).double()
        assert s.count == rows.shape[0], name
        assert_close(s.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
        assert_close(s.second_moment, rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-12)


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _mixed_flags(model: nn.Module) -> dict[str, bool]:
    model.train()
    model.enc[2].eval()  # mixed: the dropout alone in eval mode
    model.head.eval()
    return {name: m.training for name, m in model.named_modules()}


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ---- batch kinds ------------------------------------------------------------------------------
def test_tensor_tuple_and_mapping_batches():
    model = Block()
    flags = _mixed_flags(model)
    batches = [
        torch.randn(4, 6),
        (torch.randn(2, 3, 6), 2.0),  # model(*batch)
        [torch.randn(5, 6)],  # a list is also model(*batch)
        {"x": torch.randn(3, 6), "shift": 0.5},  # model(**batch)
    ]

    def call(m, b):
        if isinstance(b, dict):
            return m(**b)
        if isinstance(b, (tuple, list)):
            return m(*b)
        return m(b)

    stats = collect_input_stats(model, batches, progress=False)
    assert list(stats) == ["enc.0", "enc.3", "shared", "head", "unused"]  # named_modules order
    assert stats["enc.0"].count == 4 + 6 + 5 + 3
    assert stats["shared"].count == 2 * stats["enc.0"].count  # both calls accumulate
    assert stats["unused"].count == 0 and stats["unused"].in_features == 5
    _check_against(stats, _record_inputs(model, batches, call))
    assert _flags(model) == flags
    assert _hooks_left(model) == 0


def test_run_batch_dispatch_and_bad_batch_type():
    model = Block().eval()
    x = torch.randn(2, 6)
    with torch.no_grad():
        expected = model(x, 3.0)
        assert torch.equal(run_batch(model, (x, 3.0)), expected)
        assert torch.equal(run_batch(model, [x, 3.0]), expected)
        assert torch.equal(run_batch(model, {"x": x, "scale": 3.0}), expected)
        assert torch.equal(run_batch(model, x), model(x))
    with pytest.raises(TypeError, match="calibration batch"):
        run_batch(model, 3)


def test_a_bare_tensor_is_one_batch():
    model = Block()
    x = torch.randn(7, 6)
    stats = collect_input_stats(model, x)
    assert model.calls == 1
    assert stats["enc.0"].count == 7


def test_one_shot_generator():
    model = Block()
    data = [torch.randn(3, 6) for _ in range(4)]
    stats = collect_input_stats(model, (x for x in data))
    _check_against(stats, _record_inputs(model, data, lambda m, b: m(b)))


def test_eval_mode_without_autograd():
    model = Block()
    model.train()
    seen = []

    def probe(module, args):
        seen.append((module.training, torch.is_grad_enabled(), model.enc[2].training))

    model.enc[0].register_forward_pre_hook(probe)
    x = torch.randn(64, 6)
    stats = collect_input_stats(model, [x, x])
    assert seen == [(False, False, False)] * 2
    # dropout is off: both passes see the same inputs downstream of it
    rows = torch.cat([x, x]).double()
    assert_close(stats["enc.0"].second_moment, rows.T @ rows / 128, rtol=1e-12, atol=1e-12)
    assert model.training and model.enc[2].training


# ---- include / exclude ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("enc.*", None, ["enc.0", "enc.3"]),
        (None, ["enc.*", "unused"], ["shared", "head"]),
        (re.compile(r"enc\.\d"), "enc.3", ["enc.0"]),
        (["head", "shared"], None, ["shared", "head"]),
        ("nothing*", None, []),
    ],
)
def test_include_exclude(include, exclude, expected):
    model = Block()
    stats = collect_input_stats(model, [torch.randn(2, 6)], include=include, exclude=exclude)
    assert list(stats) == expected
    assert _hooks_left(model) == 0


def test_bad_patterns_and_arguments():
    model = Block()
    with pytest.raises(TypeError, match="include"):
        collect_input_stats(model, [torch.randn(2, 6)], include=3)
    with pytest.raises(TypeError, match="model"):
        collect_input_stats(lambda x: x, [torch.randn(2, 6)])
    with pytest.raises(TypeError, match="progress"):
        collect_input_stats(model, [torch.randn(2, 6)], progress="yes")
    for bad in (None, "abc", 3):
        with pytest.raises(TypeError, match="calibration"):
            collect_input_stats(model, bad)
    assert model.calls == 0


def test_progress_lines(capsys, monkeypatch):
    import factlin.calibration

    monkeypatch.setattr(factlin.calibration, "_PROGRESS_EVERY_S", 0.0, raising=False)
    collect_input_stats(Block(), [torch.randn(2, 6)] * 3, progress=True)
    err = capsys.readouterr().err
    assert err.count("batch") == 3 and "batch 3" in err
    collect_input_stats(Block(), [torch.randn(2, 6)] * 3, progress=False)
    assert capsys.readouterr().err == ""


# ---- failures leave the model as it was -------------------------------------------------------
def test_empty_calibration():
    model = Block()
    flags = _mixed_flags(model)
    for empty in ([], iter([]), ()):
        with pytest.raises(CalibrationError, match="empty"):
            collect_input_stats(model, empty)
    assert isinstance(CalibrationError("x"), ValueError)
    assert _flags(model) == flags and _hooks_left(model) == 0


def test_rejected_batch_names_its_index_and_leaves_the_model_unchanged():
    model = Block()
    flags = _mixed_flags(model)
    state = copy.deepcopy(model.state_dict())
    batches = [torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 4)]  # the last is wrong
    with pytest.raises(ValueError, match="calibration batch 2") as info:
        collect_input_stats(model, batches)
    assert info.value.__cause__ is not None  # the model's own error, chained
    assert _flags(model) == flags and _hooks_left(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_an_exception_of_the_model_is_wrapped_with_the_batch_index():
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            if x.shape[0] == 5:
                raise RuntimeError("boom")
            return y

    model = Failing()
    model.train()
    with pytest.raises(CalibrationError, match=r"batch 1.*RuntimeError.*boom"):
        collect_input_stats(model, [torch.randn(2, 3), torch.randn(5, 3)])
    assert model.training and model.lin.training and _hooks_left(model) == 0


def test_keyboard_interrupt_is_not_swallowed_and_hooks_are_removed():
    class Interrupting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.lin(x)
            raise KeyboardInterrupt

    model = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        collect_input_stats(model, [torch.randn(2, 3)])
    assert model.training and _hooks_left(model) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_a_layers_inputs_names_the_layer(bad):
    class Poison(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.second = nn.Linear(4, 2)

        def forward(self, x):
            h = self.first(x)
            h = torch.where(h > 1e9, h, h * bad) if x[0, 0] > 100 else h
            return self.second(h)

    model = Poison()
    good = torch.randn(3, 4)
    poisoned = good.clone()
    poisoned[0, 0] = 1000.0
    with pytest.raises(ValueError, match=r"batch 1.*'second'.*NaN or inf"):
        collect_input_stats(model, [good, poisoned])
    assert _hooks_left(model) == 0
    # NaN in the model's input itself: the first layer is named
    poisoned[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"batch 0.*'first'"):
        collect_input_stats(model, [poisoned])


def test_a_linear_called_with_the_wrong_size_is_named_with_both_sizes():
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"batch 0.*layer '0'.*\(2, 5\).*in_features is 3"):
        collect_input_stats(model, [torch.randn(2, 5)])
    assert _hooks_left(model) == 0


def test_calls_that_bypass_the_module_call_are_not_recorded():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin.forward(x)  # no hooks run

    stats = collect_input_stats(Odd(), [torch.randn(2, 4)])
    assert stats["lin"].count == 0


# ---- helpers ----------------------------------------------------------------------------------
def test_calibration_batches():
    x = torch.randn(2, 3)
    assert calibration_batches(x)[0] is x
    data = [x, x]
    assert calibration_batches(data) is data
    gen = (b for b in data)
    assert calibration_batches(gen) is gen
    materialized = calibration_batches((b for b in data), reusable=True)
    assert isinstance(materialized, list) and len(materialized) == 2
    for bad in (None, "text", b"bytes", 3):
        with pytest.raises(TypeError, match="calibration"):
            calibration_batches(bad)


def test_call_order_groups_layers_fed_the_same_tensor():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(4, 4)  # registered first, called last
            self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.never = nn.Linear(4, 4)

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            return self.out(torch.softmax(q @ k.mT, -1) @ v)

    model = Attention()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert call_order(model, torch.randn(3, 4), layers) == [["q", "k", "v"], ["out"]]
    assert _hooks_left(model) == 0


def test_collect_paired_stats_pairs_the_rows_of_both_models():
    dense = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
    compressed = copy.deepcopy(dense)
    with torch.no_grad():
        compressed[0].weight.add_(0.1 * torch.randn(6, 5))
    batches = [torch.randn(3, 5), torch.randn(2, 4, 5)]
    stats = collect_paired_stats(dense, compressed, batches, ["2"])
    with torch.no_grad():
        x = torch.cat([torch.relu(dense[0](b)).reshape(-1, 6) for b in batches]).double()
        xc = torch.cat([torch.relu(compressed[0](b)).reshape(-1, 6) for b in batches]).double()
    paired = stats["2"]
    assert paired.count == 11
    assert_close(paired.dense.second_moment, x.T @ x / 11, rtol=1e-12, atol=1e-12)
    assert_close(paired.compressed.second_moment, xc.T @ xc / 11, rtol=1e-12, atol=1e-12)
    assert_close(paired.cross_moment(False), x.T @ xc / 11, rtol=1e-12, atol=1e-12)
    assert _hooks_left(dense) == 0 and _hooks_left(compressed) == 0


def test_a_linear_registered_under_two_names_is_recorded_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    stats = collect_input_stats(model, [torch.randn(3, 4)])
    assert list(stats) == ["0"] and stats["0"].count == 6  # both calls, first name
    assert list(collect_input_stats(model, [torch.randn(3, 4)], include="2")) == ["0"]
    assert collect_input_stats(model, [torch.randn(3, 4)], exclude="2") == {}


def test_an_unsupported_batch_type_is_a_type_error_not_blamed_on_the_model():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="batch 1"):
        collect_input_stats(model, [torch.randn(2, 3), 3])


def test_running_statistics_are_not_updated():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    model.train()
    state = copy.deepcopy(model.state_dict())
    stats = collect_input_stats(model, [torch.randn(8, 4) + 3, torch.randn(8, 4)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # batch norm ran in eval mode
    assert stats["2"].count == 16 and model.training and model[1].training


def test_collect_paired_stats_refuses_models_that_call_a_layer_differently():
    class Repeat(nn.Module):
        def __init__(self, times: int) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.times = times

        def forward(self, x):
            for _ in range(self.times):
                x = self.lin(x)
            return x

    dense, compressed = Repeat(1), Repeat(2)
    compressed.train()
    with pytest.raises(ValueError, match=r"batch 0.*'lin'.*1 time.*2"):
        collect_paired_stats(dense, compressed, [torch.randn(2, 3)], ["lin"])
    assert _hooks_left(dense) == 0 and _hooks_left(compressed) == 0
    assert compressed.training and _flags(dense) == {"": True, "lin": True}
