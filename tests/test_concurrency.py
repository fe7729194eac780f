"""Several threads calling fresh layers at once: the first calls race to fill the plan caches,
the ``'auto'`` choices and the inference cache; every result must equal the single-threaded
one, and the caches must end as a single thread leaves them."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from conftest import FACTORIZATIONS

from factlin import FactorizedLinear

N_THREADS = 8
#: Batch sizes across several plan buckets (0 rows included), 2-D and 3-D inputs.
SHAPES = [(1, 48), (5, 48), (0, 48), (3, 7, 48), (64, 48), (2, 48), (17, 48), (1, 1, 48)]


def _run_threads(work) -> list:
    """``work(k)`` in ``N_THREADS`` threads started together; their results, or their error."""
    barrier = threading.Barrier(N_THREADS)
    results: list = [None] * N_THREADS
    errors: list = []

    def target(k: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[k] = work(k)
        except BaseException as exc:  # noqa: B036 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(k,)) for k in range(N_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def _inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed", "auto"])
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_threads_on_one_fresh_layer_get_the_single_threaded_results(
    factorization, implementation, grad
):
    torch.manual_seed(0)
    template = FactorizedLinear((4, 12), (6, 8), factorization=factorization, rank=0.5,
                                implementation=implementation, n_layers=2,
                                dtype=torch.float64)  # fmt: skip
    inputs = _inputs()

    def call(layer: FactorizedLinear, k: int) -> list[torch.Tensor]:
        out = []
        for j in range(len(inputs)):  # each thread its own order: different first calls
            x = inputs[(j + k) % len(inputs)]
            with torch.set_grad_enabled(grad):
                y = layer(x, (j + k) % 2)
                if grad:  # the backward of the training plans too
                    y = torch.autograd.grad(y.sum(), list(layer.parameters()), allow_unused=True)
            out.append(y)
        return out

    single = copy.deepcopy(template)
    want = [call(single, k) for k in range(N_THREADS)]
    shared = copy.deepcopy(template)  # fresh: no plan, no cache
    got = _run_threads(lambda k: call(shared, k))
    # not bitwise: a new thread may run torch's intra-op parallelism (other summation orders)
    for k in range(N_THREADS):
        for a, b in zip(got[k], want[k]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the caches hold what one thread would have put there
    assert shared.weight._plans.keys() == single.weight._plans.keys()
    assert shared._auto_choices == single._auto_choices
    assert len(shared._weight_cache) == len(single._weight_cache)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_inference_cache_under_a_race_with_an_update(factorization):
    """Threads read through the inference cache while the main thread updates the weights in
    place: once the update is done, every call sees the new weights (an entry stamped before
    the update, or built while it ran, is never served after it)."""
    torch.manual_seed(0)
    layer = FactorizedLinear((4, 12), (6, 8), factorization=factorization, rank=0.5,
                             implementation="reconstructed")  # fmt: skip
    x = torch.randn(4, 48)
    with torch.no_grad():
        old = layer(x).clone()
        new_layer = copy.deepcopy(layer)
        for p in new_layer.parameters():
            p.mul_(1.5)
        new = new_layer(x)
    start = threading.Barrier(N_THREADS + 1)
    done = threading.Event()
    seen: list = [[] for _ in range(N_THREADS)]

    def reader(k: int) -> None:
        start.wait(timeout=60)
        with torch.no_grad():
            while not done.is_set():
                seen[k].append(layer(x))
            seen[k].append(layer(x))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(N_THREADS)]
    for thread in threads:
        thread.start()
    start.wait(timeout=60)
    while not all(seen) and all(t.is_alive() for t in threads):  # every reader has the cache
        time.sleep(0.001)
    with torch.no_grad():
        for p, q in zip(layer.parameters(), new_layer.parameters()):
            p.copy_(q)  # bumps each version counter: the cache entry goes stale
    done.set()
    for thread in threads:
        thread.join(timeout=120)
    for outputs in seen:
        assert outputs, "a reader made no call"
        # every parameter is copied before done is set: the last call sees only new weights
        torch.testing.assert_close(outputs[-1], new, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen[0][0], old, rtol=1e-6, atol=1e-6)  # started before it
