"""FactorizedLinear under torch.compile, torch.export and TorchScript.

Compilation is slow on a small CPU, so each test compiles one module holding several layers.
Every (factorization, implementation, n_layers) combination is compiled with the cheap 'eager'
backend (dynamo alone: full graph, no recompilation, results); with 'aot_eager' (AOT autograd,
which builds the backward graph) each factorization runs two of them, chosen so that every
implementation meets both n_layers. A single inductor test runs where a C++ compiler works.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from conftest import DEVICES, FACTORIZATIONS
from torch import nn

from factlin import FactorizedLinear

IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")
N_LAYERS = (1, 2)
IN_SHAPE, OUT_SHAPE = (2, 3), (3, 2)


def _layer(factorization: str, implementation: str, n_layers: int, **kwargs) -> FactorizedLinear:
    return FactorizedLinear(
        IN_SHAPE,
        OUT_SHAPE,
        factorization=factorization,
        rank=2,
        implementation=implementation,
        n_layers=n_layers,
        dtype=torch.float64,
        **kwargs,
    )


ALL_VARIANTS = tuple((i, n) for i in IMPLEMENTATIONS for n in N_LAYERS)

#: (implementation, n_layers) pairs compiled with aot_eager, per factorization.
AOT_VARIANTS = {
    "cp": (("factorized", 1), ("auto", 2)),
    "tucker": (("reconstructed", 1), ("factorized", 2)),
    "tt": (("auto", 1), ("reconstructed", 2)),
}


class _Variants(nn.Module):
    """Layers of one factorization (each its last index), applied to the same input."""

    def __init__(self, factorization: str, variants=ALL_VARIANTS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _layer(factorization, implementation, n_layers) for implementation, n_layers in variants
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(x, layer.n_layers - 1) for layer in self.layers])


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is given."""

    def __init__(self, backend: str = "aot_eager") -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.backend = lookup_backend(backend)
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return self.backend(graph_module, example_inputs)


def _forward_backward(
    module: nn.Module, x: torch.Tensor, dynamic_dim: int | None = None
) -> tuple[torch.Tensor, list]:
    x = x.detach().requires_grad_(True)
    if dynamic_dim is not None:
        torch._dynamo.mark_dynamic(x, dynamic_dim)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y.detach(), [g.clone() if g is not None else None for g in grads]


def _assert_same_run(got, want, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for a, b in zip(got[1], want[1]):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _check_compiled(eager: nn.Module, backend, batches=(3, 5, 8), leading=()) -> None:
    """fullgraph compile; same results as eager, forward and backward; one graph for all."""
    torch._dynamo.reset()
    compiled = torch.compile(eager, backend=backend, fullgraph=True)
    for step, batch in enumerate(batches):
        reference = next(eager.parameters())
        x = torch.randn(
            *leading,
            batch,
            eager_in_features(eager),
            device=reference.device,
            dtype=reference.dtype,
        )
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = _forward_backward(compiled, x, dynamic_dim=len(leading))
        _assert_same_run(got, _forward_backward(eager, x))


def eager_in_features(module: nn.Module) -> int:
    return next(m for m in module.modules() if isinstance(m, FactorizedLinear)).in_features


# ---- torch.compile -------------------------------------------------------------------------
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_compile_matches_eager_without_breaks_or_recompiles(factorization):
    torch.manual_seed(0)
    model = _Variants(factorization)
    backend = _CountingBackend("eager")
    _check_compiled(model, backend)
    assert backend.graphs == 1
    # Without autograd ('auto' then counts on the inference cache, which compile skips).
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        y = torch.compile(model, backend="eager", fullgraph=True)(x)
        assert all(len(layer._weight_cache) == 0 for layer in model.layers)
        torch.testing.assert_close(y, model(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_compile_with_aot_autograd(factorization):
    torch.manual_seed(0)
    backend = _CountingBackend("aot_eager")
    _check_compiled(_Variants(factorization, AOT_VARIANTS[factorization]), backend)
    assert backend.graphs == 1


def test_compile_with_leading_dimensions_and_checkpointing():
    torch.manual_seed(0)
    layer = _layer("tt", "factorized", 2, checkpointing=True)
    layer.train()
    backend = _CountingBackend()
    _check_compiled(layer, backend, batches=(3, 4), leading=(2,))
    assert backend.graphs == 1


def test_compile_sees_parameter_updates():
    layer = _layer("cp", "reconstructed", 1)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 6, dtype=torch.float64)
    compiled(x)
    with torch.no_grad():
        layer.weight.weights.mul_(2.0)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-12, atol=1e-12)


def _has_cpp_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_with_inductor(device):
    if device == "cpu" and not _has_cpp_compiler():
        pytest.skip("inductor on CPU needs a C++ compiler")
    torch.manual_seed(0)
    layer = _layer("tt", "factorized", 1, device=device)
    backend = _CountingBackend("inductor")
    try:
        _check_compiled(layer, backend, batches=(3, 5))
    except torch._dynamo.exc.BackendCompilerFailed as error:  # a compiler that does not work
        if "Cpp" in type(error.inner_exception).__name__ or "compiler" in str(error).lower():
            pytest.skip(f"inductor cannot compile here: {error.inner_exception}")
        raise
    assert backend.graphs == 1


# ---- torch.export and torch.jit ------------------------------------------------------------
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_export_matches_eager_for_any_batch(factorization):
    model = _Variants(factorization)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(
        model, (torch.randn(4, 6, dtype=torch.float64),), dynamic_shapes=({0: batch},)
    )
    for size in (2, 9):
        x = torch.randn(size, 6, dtype=torch.float64)
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("no_grad", [False, True])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_jit_trace_matches_eager(factorization, no_grad):
    model = _Variants(factorization)
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.set_grad_enabled(not no_grad):
        model(x)  # plan the contractions first, so the trace's sanity check sees one graph
        traced = torch.jit.trace(model, (x,))
    with torch.no_grad():  # the trace reads the parameters, it holds no cached matrix
        for layer in model.layers:
            next(layer.weight.parameters()).mul_(1.5)
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_jit_trace_without_warm_up(factorization):
    """Tracing a fresh layer plans inside the trace: planning touches no tensor, so the
    trace's own sanity check (a second trace, without grad) sees the same graph."""
    model = _Variants(factorization)
    x = torch.randn(4, 6, dtype=torch.float64)
    traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), model(x), rtol=1e-12, atol=1e-12)


def test_jit_script_is_not_supported():
    # Documented limitation (README, "Guarantees"): keep this test in step with it.
    layer = _layer("cp", "factorized", 1)
    with warnings.catch_warnings():  # TorchScript warns about annotations before it fails
        warnings.simplefilter("ignore")
        with pytest.raises((RuntimeError, torch.jit.frontend.NotSupportedError)):
            torch.jit.script(layer)
