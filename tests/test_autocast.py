"""``torch.autocast``: every factorization and implementation, forward and backward, against the
float32 result (CPU bfloat16 always; CUDA float16 and bfloat16 when a GPU is present), and the
inference cache across autocast on and off."""

from __future__ import annotations

import pytest
import torch
from conftest import FACTORIZATIONS

from factlin import FactorizedLinear

IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")

#: Bound on ``||autocast result - float32 result|| / ||float32 result||``, as for layers stored
#: in these dtypes (tests/test_dtypes_devices.py): parameter gradients sum over the batch.
TOLERANCE = {torch.bfloat16: 6e-2, torch.float16: 1e-2}

CASES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    CASES += [("cuda", torch.float16), ("cuda", torch.bfloat16)]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _forward_backward(layer: FactorizedLinear, x: torch.Tensor, index: int) -> list:
    """Output, then the gradients of x and of every parameter, for a fixed random upstream
    gradient (a smooth one nearly cancels against the zero-mean columns of the weight)."""
    x = x.detach().requires_grad_(True)
    y = layer(x, index)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], upstream)
    return [y, *grads]


@pytest.mark.parametrize("device,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "reconstructed-factorized-backward"])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_autocast_forward_and_backward_match_float32(factorization, implementation, device, dtype):
    torch.manual_seed(0)
    forced = implementation.endswith("-factorized-backward")
    layer = FactorizedLinear(
        (4, 6, 8), (8, 6, 4), factorization=factorization, rank=0.3,
        implementation=implementation.split("-")[0], n_layers=2, device=device,
    )  # fmt: skip
    if forced:  # the backward of _rebuilt_linear wherever it may run (eager CPU)
        layer._factorized_backward.update({1: True, 64: True})
    # batch 1, and (4, 16): a 3-D input, batch 64
    for shape in [(1, 192), (4, 16, 192)]:
        x = torch.randn(*shape, device=device)
        if forced:
            assert layer._takes_factorized_backward(x.requires_grad_()) == (device == "cpu")
        want = _forward_backward(layer, x, 1)
        with torch.autocast(device, dtype=dtype):
            got = _forward_backward(layer, x, 1)
        assert got[0].dtype == dtype  # like nn.Linear under autocast
        assert got[1].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[2:])
        for k, (g, w) in enumerate(zip(got, want)):
            assert _relative_error(g, w) < TOLERANCE[dtype], (shape, k)


@pytest.mark.parametrize("device,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_inference_cache_is_not_shared_between_autocast_and_full_precision(
    factorization, device, dtype
):
    """The cached matrix is rebuilt in the autocast dtype: it must not be served to a call
    outside autocast (a dtype error, before), nor a float32 one inside."""
    layer = FactorizedLinear((4, 6), (6, 4), factorization=factorization, rank=0.5,
                             implementation="reconstructed", device=device)  # fmt: skip
    x = torch.randn(3, 24, device=device)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, layer.weight.to_matrix(), layer.bias)
        for _ in range(2):
            with torch.autocast(device, dtype=dtype):
                low = layer(x)
            full = layer(x)
            assert low.dtype == dtype and full.dtype == torch.float32
            assert _relative_error(low, want) < TOLERANCE[dtype]
            torch.testing.assert_close(full, want, rtol=1e-6, atol=1e-6)
