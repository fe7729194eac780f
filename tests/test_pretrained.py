"""save_pretrained / from_pretrained (factlin/pretrained.py), rebuilding a structure from a
ConversionReport (tensorize_model(structure=...)) and ``factlin inspect``."""

from __future__ import annotations

import io
import json
import math
import os

import pytest
import torch
from conftest import FACTORIZATIONS
from hypothesis import given
from strategies import layer_configs
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import factlin
from factlin import FactorizedLinear, PretrainedError, from_pretrained, save_pretrained
from factlin import pretrained as pretrained_module
from factlin.cli import main
from factlin.factorizations import FactorizedWeight


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 8)
    )


def _compressed(factorization: str, implementation: str = "auto") -> nn.Module:
    small, _ = factlin.tensorize_model(
        _mlp(), rank=0.3, factorization=factorization, implementation=implementation,
        progress=False, decomposition_kwargs={"n_iter_max": 3} if factorization == "cp" else None,
    )  # fmt: skip
    return small.eval()


class _Allocations(TorchDispatchMode):
    """Records the numel of every tensor created on a real device."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            # (the file's bytes are read into a uint8 buffer: not a weight)
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.is_floating_point()
                and not tensor.is_meta
            ):
                self.sizes.append(tensor.numel())
        return out


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_round_trip_into_random_and_meta_skeletons(tmp_path, factorization):
    small = _compressed(factorization)
    path = save_pretrained(small, tmp_path)
    weights = "model.safetensors" if pretrained_module._safetensors() else "model.pt"
    assert sorted(os.listdir(tmp_path)) == ["factlin_config.json", weights]
    assert path == os.path.join(tmp_path, weights)
    x = torch.randn(5, 64)
    expected = small(x)

    loaded = from_pretrained(_mlp(), tmp_path)
    # equal tensors; BLAS may round differently for other memory alignments
    torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-7)
    assert [type(m) for m in loaded] == [type(m) for m in small]

    with torch.device("meta"):
        skeleton = _mlp()
    allocations = _Allocations()
    with allocations:
        loaded = from_pretrained(skeleton, tmp_path)
    # nothing as large as a dense weight (the smallest is 128 x 64) was created on a device
    assert 0 < max(allocations.sizes) < 128 * 64
    assert not any(t.is_meta for t in loaded.state_dict().values())
    torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-7)
    for name, layer in small.named_modules():
        if isinstance(layer, FactorizedLinear):
            new = loaded.get_submodule(name)
            assert (new.factorization, new.rank, new.implementation) == (
                layer.factorization, layer.rank, layer.implementation
            )  # fmt: skip
            assert new.training  # the skeleton's mode (it was built in training mode)
            assert new.decomposition_info is None  # nothing was decomposed


def test_from_pretrained_never_decomposes_nor_initializes(tmp_path, monkeypatch):
    small = _compressed("tucker")
    save_pretrained(small, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not decompose or initialize")

    for name in ("init_from_tensor", "reset_parameters"):
        for cls in factlin.FACTORIZATIONS.values():
            monkeypatch.setattr(cls, name, refuse)
    x = torch.randn(3, 64)
    torch.testing.assert_close(from_pretrained(_mlp(), tmp_path)(x), small(x), rtol=1e-6, atol=1e-7)


@given(config=layer_configs(max_features=64))
def test_round_trip_property(tmp_path_factory, config):
    """Any layer (joint ones through their SubFactorizedLinear views) comes back with the same
    tensors and outputs."""
    layer = FactorizedLinear(**config, dtype=torch.float64)
    n_layers, bias = layer.n_layers, layer.bias is not None
    model = nn.ModuleList([layer] if n_layers == 1 else [layer[k] for k in range(n_layers)])
    directory = tmp_path_factory.mktemp("saved")
    save_pretrained(model, directory)
    dense = [
        nn.Linear(layer.in_features, layer.out_features, bias=bias, dtype=torch.float64)
        for _ in range(n_layers)
    ]
    loaded = from_pretrained(nn.ModuleList(dense), directory)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert sorted(saved) == sorted(restored)
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
    x = torch.randn(2, layer.in_features, dtype=torch.float64)
    for old, new in zip(model, loaded):
        torch.testing.assert_close(old(x), new(x), rtol=1e-12, atol=1e-14)
    if n_layers > 1:  # the views share one joint layer again
        assert all(view.main is loaded[0].main for view in loaded)


def test_torch_format_and_missing_safetensors(tmp_path, monkeypatch):
    small = _compressed("tt")
    x = torch.randn(2, 64)
    path = save_pretrained(small, tmp_path / "pt", weights_format="torch")
    assert path.endswith("model.pt")
    state = torch.load(path, weights_only=True)  # plain tensors: loadable safely
    assert set(state) == set(small.state_dict())
    loaded = from_pretrained(_mlp(), tmp_path / "pt")
    torch.testing.assert_close(loaded(x), small(x), rtol=1e-6, atol=1e-7)

    monkeypatch.setattr(pretrained_module, "_safetensors", lambda: None)
    assert save_pretrained(small, tmp_path / "fallback").endswith("model.pt")
    with pytest.raises(ValueError, match="pip install safetensors"):
        save_pretrained(small, tmp_path / "x", weights_format="safetensors")
    with pytest.raises(ValueError, match="weights_format='onnx'"):
        save_pretrained(small, tmp_path / "x", weights_format="onnx")


def test_shared_modules_and_tied_parameters(tmp_path):
    """A module under two names stays one module; tied parameters stay one parameter."""

    def build() -> nn.Module:
        model = nn.Module()
        model.a, model.b = nn.Linear(64, 64), None
        model.b = model.a
        model.embedding = nn.Embedding(10, 64)
        model.head = nn.Linear(64, 10, bias=False)
        model.head.weight = model.embedding.weight
        return model

    model = build()
    small, report = factlin.tensorize_model(model, rank=0.5, factorization="tt", progress=False)
    assert report["a"].aliases == ("b",) and not report["head"].converted
    save_pretrained(small, tmp_path)
    with torch.device("meta"):
        skeleton = build()
    loaded = from_pretrained(skeleton, tmp_path)
    assert loaded.a is loaded.b and isinstance(loaded.a, FactorizedLinear)
    assert loaded.head.weight is loaded.embedding.weight
    assert torch.equal(loaded.head.weight, small.head.weight)


def test_errors_name_the_problem(tmp_path):
    small = _compressed("cp")
    save_pretrained(small, tmp_path)

    with pytest.raises(FileNotFoundError, match="factlin_config.json"):
        from_pretrained(_mlp(), tmp_path / "nowhere")
    wider = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 96), nn.ReLU(),
                          nn.Linear(96, 8))  # fmt: skip
    with pytest.raises(PretrainedError, match=r"'0' is 256x64 .* in the model but 128x64"):
        from_pretrained(wider, tmp_path)
    with pytest.raises(PretrainedError, match=r"'2' \(96x128, out x in\) .* not in the model"):
        from_pretrained(nn.Sequential(nn.Linear(64, 128)), tmp_path)
    renamed = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Conv1d(128, 96, 1))
    with pytest.raises(PretrainedError, match="'2' of the model is a Conv1d"):
        from_pretrained(renamed, tmp_path)

    config = json.loads((tmp_path / "factlin_config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "factlin_config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="format_version 99, newer than this factlin"):
        from_pretrained(_mlp(), tmp_path)
    config["format_version"] = 1
    (tmp_path / "factlin_config.json").write_text(json.dumps(config))
    weights = config["weights_file"]
    os.remove(tmp_path / weights)
    with pytest.raises(FileNotFoundError, match=f"{weights} does not exist"):
        from_pretrained(_mlp(), tmp_path)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        from_pretrained("model", tmp_path)


class _WithBuffer(nn.Sequential):
    def __init__(self, extra: bool = False) -> None:
        super().__init__(nn.Linear(64, 64))
        self.register_buffer("mask", torch.arange(3.0), persistent=False)
        if extra:
            self.register_buffer("other", torch.ones(2), persistent=False)


def test_buffers_outside_the_state_dict_reach_a_meta_skeleton(tmp_path):
    small, _ = factlin.tensorize_model(_WithBuffer(), rank=0.5, progress=False)
    save_pretrained(small, tmp_path)
    assert "buffers.safetensors" in os.listdir(tmp_path) or "buffers.pt" in os.listdir(tmp_path)
    with torch.device("meta"):
        skeleton = _WithBuffer()
    loaded = from_pretrained(skeleton, tmp_path)
    assert torch.equal(loaded.mask, torch.arange(3.0))

    with torch.device("meta"):
        skeleton = _WithBuffer(extra=True)
    with pytest.raises(PretrainedError, match="other"):
        from_pretrained(skeleton, tmp_path)


@pytest.mark.parametrize("as_dict", [False, True])
def test_tensorize_model_rebuilds_a_structure_without_decomposing(monkeypatch, as_dict):
    small, report = factlin.tensorize_model(_mlp(), rank=0.3, factorization="tucker",
                                            progress=False)  # fmt: skip
    structure = json.loads(json.dumps(report.to_dict())) if as_dict else report

    def refuse(*args, **kwargs):
        raise AssertionError("no decomposition when rebuilding a structure")

    monkeypatch.setattr(FactorizedWeight, "init_from_tensor", refuse)
    for cls in factlin.FACTORIZATIONS.values():
        monkeypatch.setattr(cls, "init_from_tensor", refuse)
    rebuilt, new_report = factlin.tensorize_model(_mlp(), structure=structure)
    assert [r.rank for r in new_report.layers] == [r.rank for r in report.layers]
    assert new_report.model_params_after == report.model_params_after
    rebuilt.load_state_dict(small.state_dict())
    x = torch.randn(4, 64)
    assert torch.allclose(rebuilt(x), small(x), atol=1e-6)
    with pytest.raises(ValueError, match="structure"):
        factlin.tensorize_model(_mlp(), rank=0.5, structure=report)


def test_inspect_command(tmp_path, capsys):
    small = _compressed("tt")
    save_pretrained(small, tmp_path)
    out = io.StringIO()
    assert main(["inspect", str(tmp_path)], out=out) == 0
    text = out.getvalue()
    config = json.loads((tmp_path / "factlin_config.json").read_text())
    for record in config["layers"]:
        assert record["name"] in text and f"{record['params']:,}" in text
    total = sum(r["params"] for r in config["layers"])
    dense = sum(r["dense_params"] for r in config["layers"])
    assert f"{dense / total:.2f}x" in text
    assert config["weights_file"] in text

    out = io.StringIO()
    assert main(["inspect", str(tmp_path), "--json"], out=out) == 0
    summary = json.loads(out.getvalue())
    assert summary["layers_params"] == total and summary["layers_dense_params"] == dense
    assert summary["file_bytes"] == os.path.getsize(tmp_path / config["weights_file"])
    assert math.isclose(summary["compression"], dense / total)

    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "factlin_config.json does not exist" in capsys.readouterr().err
