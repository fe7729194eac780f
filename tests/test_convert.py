"""Tests of factlin/convert.py: tensorize_model, untensorize_model and the report."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from factlin.convert import ConversionReport, tensorize_model, untensorize_model
from factlin.layer import FactorizedLinear
from factlin.rank import count_tucker_params

# CP-ALS is by far the slowest decomposition; a couple of sweeps is enough to test the plumbing.
FAST = {"cp": {"n_iter_max": 2}, "tucker": {"n_iter_max": 2}, "tt": {}}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


class Nested(nn.Module):
    """Sequential inside a custom module inside a custom module, plus layers to skip."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(Inner(), nn.ReLU(), nn.Linear(64, 64))
        self.prime = nn.Linear(64, 97)  # 97 is prime: one mode only
        self.head = nn.Linear(97, 8)  # 8 < min_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.prime(self.encoder(x))))


class TwiceUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


# --------------------------------------------------------------------------------------------
# Walking and replacing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_nested_model(factorization):
    model = Nested()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = tensorize_model(
        model,
        rank=0.5,
        factorization=factorization,
        decomposition_kwargs=FAST[factorization],
        progress=False,
    )
    assert isinstance(out.encoder[0].fc, FactorizedLinear)
    assert isinstance(out.encoder[2], FactorizedLinear)
    assert type(out.prime) is nn.Linear and type(out.head) is nn.Linear
    assert isinstance(out.encoder[0].norm, nn.LayerNorm) and isinstance(out.encoder[1], nn.ReLU)
    # not inplace: the original is untouched
    assert type(model.encoder[2]) is nn.Linear
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])
    assert out(torch.randn(5, 32)).shape == (5, 8)
    assert [r.name for r in report.layers] == ["encoder.0.fc", "encoder.2", "prime", "head"]
    assert [r.converted for r in report.layers] == [True, True, False, False]
    assert "prime" in report["prime"].skipped or "cannot be folded" in report["prime"].skipped
    assert "min_features=16" in report["head"].skipped
    for record in report.converted:
        assert record.factorization == factorization
        assert record.in_tensorized_features is not None
        assert 0 <= record.rel_error < 1 and record.seconds >= 0


def test_exact_at_full_rank_in_float64():
    model = Nested().double()
    out, report = tensorize_model(model, rank=10**6, factorization="tt", progress=False)
    assert len(report.converted) == 2
    x = torch.randn(7, 32, dtype=torch.float64)
    torch.testing.assert_close(out(x), model(x), rtol=1e-10, atol=1e-12)
    assert max(r.rel_error for r in report.converted) < 1e-12


def test_shared_module_converted_once():
    shared = nn.Linear(64, 64)
    model = nn.Module()
    model.a = shared
    model.block = nn.Sequential(shared, nn.ReLU())
    out, report = tensorize_model(model, rank=0.5, factorization="tucker", progress=False)
    assert isinstance(out.a, FactorizedLinear)
    assert out.a is out.block[0]
    assert len(report.layers) == 1
    assert report.layers[0].name == "a" and report.layers[0].aliases == ("block.0",)
    assert report["block.0"] is report["a"]
    assert n_params(out) == report.layers[0].params_after


def test_linear_used_twice():
    torch.manual_seed(0)
    model = TwiceUsed().double()
    out, report = tensorize_model(model, rank=10**6, factorization="tt", progress=False)
    assert len(report.layers) == 1 and report.layers[0].converted
    x = torch.randn(4, 32, dtype=torch.float64)
    torch.testing.assert_close(out(x), model(x), rtol=1e-10, atol=1e-12)


def test_root_linear_and_inplace():
    linear = nn.Linear(64, 64)
    out, report = tensorize_model(linear, rank=0.5, factorization="tt", progress=False)
    assert isinstance(out, FactorizedLinear) and report.layers[0].name == ""
    assert "(model)" in str(report)
    model = nn.Sequential(nn.Linear(64, 64))
    out, _ = tensorize_model(model, rank=0.5, factorization="tt", inplace=True, progress=False)
    assert out is model and isinstance(model[0], FactorizedLinear)


def test_include_exclude_glob_and_regex():
    model = Nested()
    _, report = tensorize_model(
        model, include="encoder.*", factorization="tt", rank=0.5, progress=False
    )
    assert [r.converted for r in report.layers] == [True, True, False, False]
    assert report["prime"].skipped == "not matched by include"
    _, report = tensorize_model(
        model,
        include=[re.compile(r"encoder\.\d+(\.fc)?")],
        exclude="*.fc",
        factorization="tt",
        rank=0.5,
        progress=False,
    )
    assert report["encoder.0.fc"].skipped == "matched exclude pattern '*.fc'"
    assert report["encoder.2"].converted
    assert report["prime"].skipped == "not matched by include"


def test_skip_reasons_never_crash():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4)  # out_proj is an nn.Linear subclass
            self.small = nn.Linear(16, 16)
            self.emb = nn.Embedding(20, 32)
            self.tied = nn.Linear(32, 20)
            self.tied.weight = self.emb.weight
            self.fc = nn.Linear(64, 64)

    model = Odd()
    # TT (4,4)x(4,4) at 99%: bond 8 has exactly the dense 256 weights
    out, report = tensorize_model(
        model, rank=0.99, factorization="tt", n_tensorized_modes=2, progress=False
    )
    reasons = {r.name: r.skipped for r in report.layers}
    assert "subclass of nn.Linear" in reasons["attn.out_proj"]
    assert "not fewer than the dense 256" in reasons["small"]
    assert "shared with 'emb'" in reasons["tied"]
    assert not report.converted
    assert out.tied.weight is out.emb.weight
    assert report.params_after == report.params_before
    q = torch.randn(3, 1, 32)
    assert out.attn(q, q, q)[0].shape == (3, 1, 32)
    _, report = tensorize_model(
        model,
        rank=0.5,
        factorization="tucker",
        decomposition_kwargs={"memory_limit_bytes": 1},
        progress=False,
    )
    assert report["fc"].skipped.startswith("decomposition failed: tucker(")  # MemoryLimitError


def test_rank_mapping():
    model = Nested()
    _, report = tensorize_model(
        model,
        rank={"encoder.2": 3, re.compile(r".*\.fc"): (2, 2, 2, 2, 2, 2), "prime": 0.5},
        factorization="tucker",
        progress=False,
    )
    assert report["encoder.2"].rank == (3, 3, 3, 3, 3, 3)
    assert report["encoder.0.fc"].rank == (2, 2, 2, 2, 2, 2)
    # exact names win over patterns; layers without an entry are skipped
    _, report = tensorize_model(
        model, rank={"*": 2, "encoder.2": 4}, factorization="tucker", progress=False
    )
    assert report["encoder.2"].rank == (4, 4, 4, 4, 4, 4)
    assert report["encoder.0.fc"].rank == (2, 2, 2, 2, 2, 2)
    _, report = tensorize_model(model, rank={"encoder.2": 4}, factorization="tt", progress=False)
    assert "rank mapping" in report["encoder.0.fc"].skipped


# --------------------------------------------------------------------------------------------
# Budget and tolerance
# --------------------------------------------------------------------------------------------
def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128),
        nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_budget_within_five_percent(factorization, budget):
    model = mlp()
    out, report = tensorize_model(
        model,
        budget=budget,
        factorization=factorization,
        decomposition_kwargs=FAST[factorization],
        progress=False,
    )
    target = budget * report.params_before
    assert abs(report.params_after - target) <= 0.05 * target
    assert report.params_after == sum(
        n_params(m) for m in out.modules() if isinstance(m, (nn.Linear, FactorizedLinear))
    )
    assert report["6"].skipped is not None  # the 10-way head stays dense


def test_budget_errors():
    with pytest.raises(ValueError, match="budget=0.3 chooses every rank"):
        tensorize_model(mlp(), budget=0.3, rank=0.5)
    with pytest.raises(ValueError, match="both choose the ranks"):
        tensorize_model(mlp(), budget=0.3, tolerance=0.1, factorization="tt")
    with pytest.raises(ValueError, match="closest reachable total"):
        tensorize_model(mlp(), budget=1e-4, factorization="tt", progress=False)
    with pytest.raises(ValueError, match="budget=-1.0"):
        tensorize_model(mlp(), budget=-1)


def low_rank_model(factorization: str) -> nn.Sequential:
    """A 64 -> 64 layer of low rank in ``factorization`` (plus 0.1% noise), then a random one."""
    torch.manual_seed(0)
    structured = FactorizedLinear(
        (4, 4, 4), (4, 4, 4), factorization=factorization, rank=2, dtype=torch.float64
    ).to_linear()
    with torch.no_grad():
        noise = torch.randn(64, 64, dtype=torch.float64)
        structured.weight += 1e-3 * structured.weight.norm() * noise / noise.norm()
    return nn.Sequential(structured, nn.ReLU(), nn.Linear(64, 64).double())


@pytest.mark.parametrize("factorization", ["tt", "tucker"])
def test_tolerance(factorization):
    model = low_rank_model(factorization)
    _, report = tensorize_model(model, tolerance=0.05, factorization=factorization, progress=False)
    first, second = report.layers
    assert first.converted and first.rel_error <= 0.05
    assert first.params_after < first.params_before
    # a random (full-rank) weight needs more parameters than dense at this tolerance
    assert not second.converted and "tolerance=0.05" in second.skipped
    # the rank caps the ranks: the error target is then out of reach
    _, report = tensorize_model(
        model, tolerance=0.05, rank=1, factorization=factorization, progress=False
    )
    assert "rank cap reached" in report.layers[0].skipped


def test_tolerance_rejected_for_cp():
    with pytest.raises(ValueError, match="tolerance=0.1 is not supported.*'cp'"):
        tensorize_model(mlp(), tolerance=0.1, factorization="cp")
    with pytest.raises(ValueError, match="tolerance"):
        tensorize_model(mlp(), tolerance=1.5, factorization="tt")


# --------------------------------------------------------------------------------------------
# Round trip and report
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt"])
def test_untensorize_round_trip_float64(factorization):
    model = Nested().double()
    small, _ = tensorize_model(
        model,
        rank=0.5,
        factorization=factorization,
        decomposition_kwargs=FAST[factorization],
        progress=False,
    )
    back = untensorize_model(small)
    assert not any(isinstance(m, FactorizedLinear) for m in back.modules())
    assert type(back.encoder[2]) is nn.Linear
    assert isinstance(small.encoder[2], FactorizedLinear)  # not inplace
    x = torch.randn(6, 32, dtype=torch.float64)
    torch.testing.assert_close(back(x), small(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        back.encoder[2].weight, small.encoder[2].weight.to_matrix(), rtol=0, atol=0
    )
    assert untensorize_model(back, inplace=True) is back


def test_untensorize_shared_sub_and_joint_layers():
    joint = FactorizedLinear((4, 4), (4, 4), factorization="tt", rank=4, n_layers=2)
    model = nn.Module()
    model.joint = joint
    model.first, model.second = joint[0], joint[1]
    model.alias = model.first
    back = untensorize_model(model)
    assert isinstance(back.joint, FactorizedLinear)  # n_layers > 1: no single nn.Linear
    assert type(back.first) is nn.Linear and back.alias is back.first
    x = torch.randn(3, 16)
    torch.testing.assert_close(back.second(x), model.second(x))
    assert type(untensorize_model(FactorizedLinear((4, 4), (4, 4)))) is nn.Linear


def test_report_counts_and_format():
    model = Nested()
    before_linear = sum(n_params(m) for m in model.modules() if isinstance(m, nn.Linear))
    out, report = tensorize_model(model, rank=0.25, factorization="tucker", progress=False)
    assert isinstance(report, ConversionReport)
    assert report.params_before == before_linear
    assert report.model_params_before == n_params(model)
    assert report.model_params_after == n_params(out)
    for record in report.layers:
        module = out.get_submodule(record.name)
        assert record.params_after == n_params(module)
        assert record.params_before == n_params(model.get_submodule(record.name))
    fc = out.encoder[2]
    assert report["encoder.2"].params_after == count_tucker_params((4, 4, 4, 4, 4, 4), fc.rank) + 64
    assert report.compression == pytest.approx(report.params_before / report.params_after)
    text = str(report)
    assert "encoder.0.fc" in text and "skipped: min(in, out)=8" in text
    assert "2 of 4 linear layers converted" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["params_after"] == report.params_after
    assert data["layers"][1]["rank"] == list(fc.rank)
    assert data["layers"][3]["skipped"].startswith("min(in, out)")


def test_progress(capsys):
    tensorize_model(Nested(), rank=0.5, factorization="tt", progress=True)
    err = capsys.readouterr().err
    assert "factlin: [1/4] encoder.0.fc: tt rank" in err and "[4/4] head: skipped" in err
    for progress in (False, None):  # None: quiet when the conversion is fast
        tensorize_model(Nested(), rank=0.5, factorization="tt", progress=progress)
        assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------
# Bad arguments: raised before any work
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"factorization": "foo"}, ValueError, r"factorization='foo' is not known.*'tucker'"),
        ({"factorization": 3}, TypeError, "factorization=3"),
        ({"rank": -1}, ValueError, "rank=-1"),
        ({"rank": "half"}, ValueError, "rank='half'"),
        ({"rank": {"fc": -2}}, ValueError, "rank mapping entry 'fc'"),
        ({"rank": {3: 0.5}}, TypeError, "rank mapping key 3"),
        ({"rank": {}}, ValueError, "at least one entry"),
        ({"implementation": "fast"}, ValueError, "implementation='fast'"),
        ({"include": 5}, TypeError, "include=5"),
        ({"exclude": ["a", 1]}, TypeError, "exclude="),
        ({"min_features": 0}, ValueError, "min_features=0"),
        ({"n_tensorized_modes": 0}, ValueError, "n_tensorized_modes=0"),
        ({"decomposition_kwargs": [1]}, TypeError, "decomposition_kwargs"),
        ({"inplace": 1}, TypeError, "inplace=1 "),
        ({"progress": "yes"}, TypeError, "progress='yes'"),
        ({"tolerance": 0.1, "factorization": "tt", "decomposition_kwargs": {"rel_tol": 0.1}},
         ValueError, "rel_tol"),
    ],
)  # fmt: skip
def test_bad_arguments(monkeypatch, kwargs, error, match):
    def fail(*args, **kw):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(FactorizedLinear, "from_linear", fail)
    model = Nested()
    with pytest.raises(error, match=match):
        tensorize_model(model, **{"inplace": True, **kwargs})
    assert type(model.encoder[2]) is nn.Linear


def test_bad_model():
    with pytest.raises(TypeError, match="model="):
        tensorize_model("model")
    with pytest.raises(TypeError, match="model="):
        untensorize_model(None)
    with pytest.raises(TypeError, match="inplace="):
        untensorize_model(nn.Linear(2, 2), inplace="no")


def test_unknown_decomposition_kwarg_propagates_and_leaves_model_intact():
    model = Nested()
    with pytest.raises(TypeError):
        tensorize_model(
            model, rank=0.5, factorization="tt", decomposition_kwargs={"bogus": 1}, inplace=True
        )
    assert type(model.encoder[2]) is nn.Linear and type(model.encoder[0].fc) is nn.Linear
