"""``torch.distributed`` with factorized layers, on 2 CPU processes (gloo, loopback only).

One job of 2 processes is started for the whole module (the import of torch and the process
group cost seconds; once is enough): each process runs every check in :data:`CHECKS` in the
same order and writes one result per check, which the tests below read.

* DDP and FSDP2 (``fully_shard`` on each layer and on the model): 3 SGD steps on a global batch
  split over the ranks equal 3 steps of one process on the whole batch, for every factorization
  and implementation; evaluations between the steps (``torch.no_grad``) equal the reference's,
  so no inference cache serves a stale or a sharded weight.
* ``torch.distributed.checkpoint``: a sharded model saved and loaded through
  ``get_model_state_dict`` / ``set_model_state_dict``, and as a full state dict into one process.
* Distributed conversion: ``tensorize_model(..., process_group=...)`` gives on every rank a model
  bitwise equal to the single-process conversion.

The processes rendezvous through a file in a temporary directory (no port to choose) and gloo
is bound to the loopback interface.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

WORLD = 2
#: The whole job (start, imports, every check) must end within this; a hung collective
#: fails on its own after _COLLECTIVE_TIMEOUT_S.
JOB_TIMEOUT_S = 420
_COLLECTIVE_TIMEOUT_S = 120
FACTORIZATIONS = ("cp", "tucker", "tt")
IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")
STEPS = 3
#: float64 throughout: results differ from the reference by summation order only.
TOLERANCE = dict(rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# The checks (run in each of the 2 processes)
# ---------------------------------------------------------------------------------------------
class _Net(nn.Module):
    """Two factorized layers; the first one's output is changed in place, as residual code
    does (``h += ...``): FSDP2's backward hook on a layer output must survive that."""

    def __init__(self, factorization: str, implementation: str) -> None:
        super().__init__()
        from factlin import FactorizedLinear

        kwargs = dict(factorization=factorization, rank=0.5, implementation=implementation,
                      dtype=torch.float64)  # fmt: skip
        self.fc1 = FactorizedLinear((4, 6), (6, 4), **kwargs)
        self.fc2 = FactorizedLinear((4, 6), (3, 4), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h += 0.5
        return self.fc2(torch.tanh(h))


def _batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2 * world, 3, 24, generator=generator, dtype=torch.float64),
         torch.randn(2 * world, 3, 12, generator=generator, dtype=torch.float64))
        for _ in range(STEPS)
    ]  # fmt: skip


def _eval_input() -> torch.Tensor:
    return torch.randn(5, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{what}: {m}")


def _train_like_reference(
    kind: str, factorization: str, implementation: str, rank: int, world: int, tmp: Path
) -> None:
    """``kind`` ('ddp' or 'fsdp') training equals one process on the global batch."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)  # the same initial model on every rank
    reference = _Net(factorization, implementation)
    model = copy.deepcopy(reference)
    if kind == "ddp":
        wrapped = DistributedDataParallel(model)
        local = model
    else:
        fully_shard(model.fc1)
        fully_shard(model.fc2)
        fully_shard(model)
        wrapped = local = model
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.2)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2)
    x_eval = _eval_input()
    for step, (x, target) in enumerate(_batches(world)):
        with torch.no_grad():  # the inference cache's path ('reconstructed', 'auto')
            _close(wrapped(x_eval), reference(x_eval), f"eval before step {step}")
        rows = slice(2 * rank, 2 * rank + 2)
        nn.functional.mse_loss(wrapped(x[rows]), target[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
        nn.functional.mse_loss(reference(x), target).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    with torch.no_grad():
        _close(wrapped(x_eval), reference(x_eval), "eval after the steps")
    for (name, p), q in zip(local.named_parameters(), reference.parameters()):
        full = p.full_tensor() if kind == "fsdp" else p
        _close(full.detach(), q.detach(), name)
    layers = (local.fc1, local.fc2)
    if kind == "fsdp":  # never cached while FSDP2 rewrites the parameters
        assert all(len(layer._weight_cache) == 0 for layer in layers)
    elif implementation == "reconstructed":  # and used otherwise
        assert all(len(layer._weight_cache) == 1 for layer in layers)
    dist.barrier()


def _checkpoint_round_trip(factorization: str, rank: int, world: int, tmp: Path) -> None:
    """A sharded model through ``torch.distributed.checkpoint`` and back; its full state dict
    into one process; a single-process state dict into a sharded model from rank 0."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def sharded(seed: int) -> _Net:
        torch.manual_seed(seed)
        net = _Net(factorization, "auto")
        fully_shard(net.fc1)
        fully_shard(net.fc2)
        fully_shard(net)
        return net

    x_eval = _eval_input()
    model = sharded(0)
    x, target = _batches(world)[0]
    rows = slice(2 * rank, 2 * rank + 2)
    nn.functional.mse_loss(model(x[rows]), target[rows]).backward()
    torch.optim.SGD(model.parameters(), lr=0.2).step()  # not the initial values any more
    with torch.no_grad():
        want = model(x_eval)
    state = get_model_state_dict(model)
    assert all(type(t).__name__ == "DTensor" for t in state.values())  # sharded
    directory = tmp / f"checkpoint-{factorization}"
    dcp.save(state, checkpoint_id=str(directory))
    loaded = sharded(1)
    with torch.no_grad():
        assert not torch.allclose(loaded(x_eval), want)
    into = get_model_state_dict(loaded)
    dcp.load(into, checkpoint_id=str(directory))
    set_model_state_dict(loaded, into)
    with torch.no_grad():
        _close(loaded(x_eval), want, "sharded checkpoint round trip")
    for (name, p), q in zip(loaded.named_parameters(), model.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), name

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    single = _Net(factorization, "auto")
    single.load_state_dict(full)  # factlin's config check included
    with torch.no_grad():
        _close(single(x_eval), want, "full state dict in one process")

    fresh = sharded(2)  # a single-process state dict, loaded from rank 0 into a sharded model
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(fresh, single.state_dict() if rank == 0 else {}, options=options)
    with torch.no_grad():
        _close(fresh(x_eval), want, "full state dict broadcast from rank 0")
    dist.barrier()


def _dense_model() -> nn.Module:
    """Linear layers of several sizes (unequal fitting costs), one too small to convert."""
    torch.manual_seed(3)
    sizes = [64, 96, 128, 64, 48, 96, 32, 8]  # the last layer (32 -> 8) stays dense
    return nn.Sequential(*[nn.Linear(i, o) for i, o in zip(sizes, sizes[1:])])


def _conversion_matches_one_process(factorization: str, rank: int, world: int, tmp: Path) -> None:
    """Every rank's model is bitwise the single-process conversion; each rank fitted a share."""
    import torch.distributed as dist

    import factlin
    from factlin import convert

    # TT: with the folding search (cheap there); CP and Tucker: planned foldings, few sweeps
    cheap = (
        {}
        if factorization == "tt"
        else dict(decomposition_kwargs={"n_iter_max": 5}, search_shapes=False)
    )
    kwargs = dict(rank=0.3, factorization=factorization, progress=False, **cheap)
    fitted = []
    original = convert.FactorizedLinear.from_linear

    def counting(*args, **kw):
        fitted.append(1)
        return original(*args, **kw)

    want, want_report = factlin.tensorize_model(_dense_model(), **kwargs)
    convert.FactorizedLinear.from_linear = counting
    try:
        got, report = factlin.tensorize_model(
            _dense_model(), process_group=dist.group.WORLD, **kwargs
        )
    finally:
        convert.FactorizedLinear.from_linear = original
    n_converted = len(want_report.converted)
    assert 0 < len(fitted) < n_converted, (len(fitted), n_converted)  # a share, not all
    counts: list = [None] * world
    dist.all_gather_object(counts, len(fitted))
    assert sum(counts) == n_converted, counts
    assert str(got) == str(want)
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for key in want_state:
        assert torch.equal(got_state[key], want_state[key]), key
    for a, b in zip(report.layers, want_report.layers):
        a_fields, b_fields = a.to_dict(), b.to_dict()
        a_fields.pop("seconds"), b_fields.pop("seconds")
        assert a_fields == b_fields, (a_fields, b_fields)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(got(x), want(x))


def _calibrated_conversion(rank: int, world: int, tmp: Path) -> None:
    """Each rank's calibration batches: statistics summed over the ranks, as one process with
    all the batches (up to float64 summation order); every rank the same model."""
    import torch.distributed as dist

    import factlin

    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(16, 64, generator=generator) for _ in range(2 * world)]
    # the planned foldings: a search by output error could flip between near-equal ones on
    # statistics that differ in the last bits
    kwargs = dict(rank=0.3, factorization="tucker", progress=False, include=["1", "2"],
                  calibration_kwargs={"refine": False}, search_shapes=False)  # fmt: skip
    want, _ = factlin.tensorize_model(_dense_model(), calibration=batches, **kwargs)
    got, _ = factlin.tensorize_model(
        _dense_model(), calibration=batches[rank::world], process_group=dist.group.WORLD,
        **kwargs,
    )  # fmt: skip
    state = {k: v for k, v in got.state_dict().items()}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, state)
    for other in everyone:
        for key in state:
            assert torch.equal(other[key], state[key]), key
    x = torch.randn(8, 64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(got(x), want(x), rtol=1e-4, atol=1e-5)


def _a_failed_fit_raises_on_every_rank(rank: int, world: int, tmp: Path) -> None:
    """A fit that raises on its owner raises on every rank, after the exchange (no hang)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from factlin.distributed import distribute_fits
    from factlin.report import LayerRecord

    items = [SimpleNamespace(record=LayerRecord(name=f"l{k}", shape=(4, 4), params_before=16,
                                                params_after=16), module=nn.Linear(4, 4))
             for k in range(4)]  # fmt: skip

    def fit(item):
        if item.record.name == "l1":
            raise RuntimeError("boom")
        return nn.Linear(4, 4)

    try:
        distribute_fits(items, fit, dist.group.WORLD, costs=[1.0, 4.0, 2.0, 3.0])
    except Exception as exc:
        assert "boom" in str(exc), exc
    else:
        raise AssertionError("no error")
    dist.barrier()


def _checks() -> list[tuple[str, Callable[[int, int, Path], None]]]:
    """``(name, check(rank, world, tmp))`` in the order every rank runs them."""
    checks: list[tuple[str, Callable[[int, int, Path], None]]] = []
    for kind in ("ddp", "fsdp"):  # DDP first: it expects the inference cache to be on
        for factorization in FACTORIZATIONS:
            for implementation in IMPLEMENTATIONS:
                check = partial(_train_like_reference, kind, factorization, implementation)
                checks.append((f"{kind}-{factorization}-{implementation}", check))
    for factorization in FACTORIZATIONS:
        check = partial(_checkpoint_round_trip, factorization)
        checks.append((f"checkpoint-{factorization}", check))
    checks.append(("cache-after-fsdp", _cache_after_fsdp))
    for factorization in FACTORIZATIONS:
        check = partial(_conversion_matches_one_process, factorization)
        checks.append((f"convert-{factorization}", check))
    checks.append(("convert-calibrated", _calibrated_conversion))
    checks.append(("convert-failure", _a_failed_fit_raises_on_every_rank))
    return checks


def _cache_after_fsdp(rank: int, world: int, tmp: Path) -> None:
    """Once no FSDP2 module is left, plain layers use their inference cache again."""
    from factlin import FactorizedLinear
    from factlin.weight_cache import fully_sharded

    gc.collect()
    assert not fully_sharded()
    layer = FactorizedLinear((4, 6), (6, 4), implementation="reconstructed")
    with torch.no_grad():
        layer(torch.randn(2, 24))
    assert len(layer._weight_cache) == 1


def _worker(rank: int, world: int, init_method: str, out: Path) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S),
    )  # fmt: skip
    results = {}
    only = os.environ.get("FACTLIN_DISTRIBUTED_ONLY")  # a prefix, to run some checks by hand
    for name, check in _checks():
        if only and not name.startswith(only):
            continue
        tic = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                check(rank, world, out)
                bad = [str(w.message) for w in caught if "view" in str(w.message)]
                results[name] = {"ok": not bad, "detail": "; ".join(bad)}
            except Exception:
                results[name] = {"ok": False, "detail": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - tic
        (out / f"results-{rank}.json").write_text(json.dumps(results))  # partial on a hang
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The tests (in pytest's process)
# ---------------------------------------------------------------------------------------------
def _distributed_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(
    not _distributed_available(), reason="torch.distributed with gloo is not available"
)

CHECK_NAMES = [name for name, _ in _checks()]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Run the 2-process job once; each rank's results by check name."""
    out = tmp_path_factory.mktemp("distributed")
    init_method = "file://" + str(out / "rendezvous")
    env = dict(os.environ, GLOO_SOCKET_IFNAME=_loopback(), OMP_NUM_THREADS="1")
    logs = [open(out / f"log-{rank}.txt", "w") for rank in range(WORLD)]
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(WORLD), init_method, str(out)],
            env=env,
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for rank in range(WORLD)
    ]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:  # only the processes started here
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    found = []
    for rank in range(WORLD):
        path = out / f"results-{rank}.json"
        found.append(json.loads(path.read_text()) if path.exists() else {})
        found[-1]["_log"] = (out / f"log-{rank}.txt").read_text()[-4000:]
    return found


def _loopback() -> str:
    """The loopback interface's name, for gloo to bind to (never an outside address)."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return "lo"
    return next((name for name in names if name.startswith("lo")), "lo")


# ---- in this process: the assignment, the cost estimate, the argument checks ----------------
def test_assign_layers_is_longest_processing_time_first():
    from factlin.distributed import assign_layers

    assert assign_layers([5.0, 1.0, 4.0, 3.0], 2) == [0, 0, 1, 1]  # 5 | 4, 3 | 1: loads 6, 7
    assert assign_layers([], 3) == []
    assert assign_layers([1.0, 1.0, 1.0], 1) == [0, 0, 0]
    costs = [7.0, 7.0, 6.0, 5.0, 4.0, 4.0, 3.0]
    owners = assign_layers(costs, 3)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert max(loads) <= 4 / 3 * 12  # LPT's bound; the best split is 12, 12, 12


def test_fit_cost_grows_with_size_and_rank():
    from factlin.distributed import estimate_fit_flops

    for factorization in FACTORIZATIONS:
        small = estimate_fit_flops(factorization, 0.1, (8, 8), (8, 8))
        assert estimate_fit_flops(factorization, 0.3, (8, 8), (8, 8)) > small
        assert estimate_fit_flops(factorization, 0.1, (16, 8), (8, 16)) > small
        assert estimate_fit_flops(factorization, 0.1, (8, 8), (8, 8), calibrated=True) > small


@pytest.mark.parametrize("bad", ["WORLD", 0, object()])
def test_process_group_must_be_a_process_group(bad):
    import factlin

    with pytest.raises(TypeError, match="process_group=.*ProcessGroup"):
        factlin.tensorize_model(nn.Linear(32, 32), rank=0.5, process_group=bad, progress=False)


def test_a_shared_generator_is_refused_with_a_process_group(monkeypatch):
    import factlin
    from factlin import convert

    monkeypatch.setattr(convert, "check_process_group", lambda name, value: value)
    with pytest.raises(TypeError, match="random_state"):
        factlin.tensorize_model(
            nn.Linear(32, 32), rank=0.5, process_group="a group",
            decomposition_kwargs={"random_state": torch.Generator()},
        )  # fmt: skip


def test_why_the_inference_cache_is_off_under_fsdp2(monkeypatch):
    """FSDP2's all-gather rewrites a parameter in place with its version counter preserved, at
    an address the allocator may hand back unchanged: the cache's stamp cannot see that (the
    old matrix is served), so the layer does not cache while FSDP2 manages a module."""
    from factlin import FactorizedLinear
    from factlin import layer as layer_module

    layer = FactorizedLinear((4, 6), (6, 4), implementation="reconstructed")
    x = torch.randn(3, 24)
    with torch.no_grad():
        before = layer(x)
        factor = layer.weight.parameter_tensors()[0]
        with torch.autograd._unsafe_preserve_version_counter(factor):  # as FSDP2 copies
            factor.mul_(2.0)
        assert torch.equal(layer(x), before)  # stale: what a stamp-only cache does
        monkeypatch.setattr(layer_module, "fully_sharded", lambda: True)
        after = layer(x)
        want = nn.functional.linear(x, layer.weight.to_matrix(), layer.bias)
    torch.testing.assert_close(after, want)
    assert not torch.allclose(after, before)


# ---- the 2-process job -----------------------------------------------------------------------
@pytest.mark.parametrize("check", CHECK_NAMES)
def test_distributed(results, check):
    for rank, found in enumerate(results):
        entry = found.get(check)
        assert entry is not None, f"rank {rank} did not run {check!r}; its log:\n{found['_log']}"
        assert entry["ok"], f"rank {rank}, {check}:\n{entry['detail']}"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
