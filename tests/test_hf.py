"""Hugging Face ``transformers`` models: conversion (``Conv1D`` included), GPT-2 generation,
``save_pretrained`` / ``from_pretrained`` round trips and conversion back. Small randomly
initialized models built from configs: nothing is downloaded. The real models need the ``hf``
extra (``make test-hf``) and skip without it; the ``Conv1D`` adapter is tested always, on a
stand-in defined like transformers' when transformers is not installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import factlin
from factlin import FactorizedLinear, from_pretrained, save_pretrained, untensorize_model

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs the hf extra")


class _StandInConv1D(nn.Module):
    """``transformers.pytorch_utils.Conv1D`` as transformers defines it: ``nf`` outputs, ``nx``
    inputs, the weight stored ``(nx, nf)``, ``x @ weight + bias``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


@pytest.fixture
def Conv1D(monkeypatch):  # noqa: N802 -- the class
    """transformers' Conv1D, or the stand-in registered where factlin looks for it."""
    if HAS_TRANSFORMERS:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    module = types.ModuleType("transformers.pytorch_utils")
    _StandInConv1D.__module__ = module.__name__
    module.Conv1D = _StandInConv1D
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", module)
    return _StandInConv1D


def test_factlin_does_not_import_transformers():
    code = (
        "import sys, torch, factlin\n"
        "factlin.tensorize_model(torch.nn.Sequential(torch.nn.Linear(32, 32)), rank=0.5,"
        " progress=False)\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_conv1d_layers_convert_save_load_and_come_back(tmp_path, Conv1D):  # noqa: N803
    def build() -> nn.Module:
        return nn.Sequential(Conv1D(48, 32), nn.GELU(), Conv1D(32, 48), nn.Linear(32, 32))

    torch.manual_seed(0)
    dense = build()
    small, report = factlin.tensorize_model(dense, rank=0.5, factorization="tt", progress=False)
    assert [r.converted for r in report.layers] == [True, True, True]
    assert [r.shape for r in report.layers] == [(48, 32), (32, 48), (32, 32)]  # (out, in)
    x = torch.randn(4, 32)
    y = small(x)

    save_pretrained(small, tmp_path)
    with torch.device("meta"):
        skeleton = build()
    loaded = from_pretrained(skeleton, tmp_path)
    torch.testing.assert_close(loaded(x), y, rtol=1e-5, atol=1e-6)

    back = untensorize_model(loaded)
    assert [type(m) for m in back] == [Conv1D, nn.GELU, Conv1D, nn.Linear]
    assert back[0].weight.shape == (32, 48)  # stored transposed again
    torch.testing.assert_close(back(x), y, rtol=1e-4, atol=1e-5)


def test_from_linear_accepts_conv1d_and_to_linear_gives_it_back(Conv1D):  # noqa: N803
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs: weight stored (16, 24)
    linear = nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(torch.randn(24))
        conv.bias.copy_(linear.bias)
    kwargs = {"rank": 16, "factorization": "tt", "auto_tensorize": False,
              "in_tensorized_features": (4, 4), "out_tensorized_features": (4, 6)}  # fmt: skip
    from_conv = FactorizedLinear.from_linear(conv, **kwargs)
    from_linear = FactorizedLinear.from_linear(linear, **kwargs)
    x = torch.randn(3, 16)
    torch.testing.assert_close(from_conv(x), from_linear(x))
    torch.testing.assert_close(from_conv(x), conv(x), rtol=1e-4, atol=1e-5)  # full rank

    rebuilt = from_conv.to_linear()
    assert type(rebuilt) is Conv1D and (rebuilt.nf, rebuilt.nx) == (24, 16)
    torch.testing.assert_close(rebuilt(x), from_conv(x), rtol=1e-5, atol=1e-6)
    assert type(from_linear.to_linear()) is nn.Linear


# ---- real transformers models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def transformers():
    if not HAS_TRANSFORMERS:
        pytest.skip("needs the hf extra (pip install 'factlin[hf]', or make test-hf)")
    import transformers

    return transformers


def _gpt2(transformers) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def _bert(transformers) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


def _vit(transformers) -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    return transformers.ViTModel(config).eval()


MODELS = {
    "gpt2": (_gpt2, lambda: {"input_ids": torch.randint(1, 64, (2, 8))}, "logits"),
    "bert": (_bert, lambda: {"input_ids": torch.randint(1, 64, (2, 8))}, "last_hidden_state"),
    "vit": (_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, "last_hidden_state"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_run_save_and_load(tmp_path, transformers, name):
    build, inputs, output = MODELS[name]
    torch.manual_seed(0)
    dense = build(transformers)
    small, report = factlin.tensorize_model(dense, rank=0.5, factorization="tt", progress=False)
    assert report.converted and report.model_params_after < report.model_params_before
    batch = inputs()
    with torch.no_grad():
        y = getattr(small(**batch), output)
        assert y.shape == getattr(dense(**batch), output).shape and torch.isfinite(y).all()

    save_pretrained(small, tmp_path)
    with torch.device("meta"):  # BERT's position_ids come from buffers.safetensors
        skeleton = build(transformers)
    loaded = from_pretrained(skeleton, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(getattr(loaded(**batch), output), y, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_layers_are_converted_and_generate_runs(tmp_path, transformers):
    torch.manual_seed(0)
    dense = _gpt2(transformers)
    small, report = factlin.tensorize_model(dense, rank=0.5, factorization="tucker",
                                            progress=False)  # fmt: skip
    converted = {r.name for r in report.converted}
    assert "transformer.h.0.attn.c_attn" in converted and "transformer.h.1.mlp.c_proj" in converted
    assert report["transformer.h.0.attn.c_attn"].shape == (96, 32)  # (out, in), not Conv1D's
    assert not report["lm_head"].converted  # tied to the embedding
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        tokens = small.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (2, 9) and torch.equal(tokens[:, :5], ids)

    # a meta skeleton: nothing dense allocated, the tied head stays tied
    save_pretrained(small, tmp_path)
    with torch.device("meta"):
        skeleton = _gpt2(transformers)
    loaded = from_pretrained(skeleton, tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        again = loaded.generate(ids, max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(loaded(ids).logits, small(ids).logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, tokens)

    back = untensorize_model(small)
    assert type(back.transformer.h[0].attn.c_attn) is transformers.pytorch_utils.Conv1D
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, small(ids).logits, rtol=1e-4, atol=1e-5)
