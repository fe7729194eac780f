"""ONNX export (``torch.onnx.export(..., dynamo=True)``) of factorized layers: a dynamic batch,
outputs reproduced by onnxruntime at other batch sizes, and a file that keeps the compression
(the export plan of factlin/factorizations/_base.py leaves no product of factors alone for the
exporter to fold into a larger constant). Needs the ``onnx`` extra; skipped without it.

One export covers every factorization and implementation (one layer each, in sequence): an
export costs seconds, the layers' checks are per layer."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from conftest import FACTORIZATIONS
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from factlin import FactorizedLinear  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # raised inside torch.export's pytree handling on some torch versions, not by factlin
    "ignore:.*LeafSpec.*:FutureWarning",
    "ignore::DeprecationWarning",
)

IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")
WIDTH = 256
#: Allowed file size: 1.25 x the parameters' bytes plus this (graph, names, exporter metadata).
FIXED_OVERHEAD = 64 * 1024
LAYERS = [(f, i) for f in FACTORIZATIONS for i in IMPLEMENTATIONS]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for factorization, implementation in LAYERS:
        layers += [
            FactorizedLinear(
                (4, 8, 8),
                (8, 8, 4),
                factorization=factorization,
                rank=0.5,
                implementation=implementation,
            ),  # fmt: skip
            nn.Tanh(),
        ]
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model, (torch.randn(4, WIDTH),), dynamo=True, dynamic_shapes=({0: batch},),
        input_names=["x"], output_names=["y"], verbose=False,
    )  # fmt: skip
    program.save(path)
    return model, path


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def test_file_keeps_the_compression(exported):
    model, path = exported
    parameters = sum(_bytes(p) for p in model.parameters())
    dense = sum(4 * (WIDTH * WIDTH + WIDTH) for _ in LAYERS)
    assert parameters < 0.6 * dense  # the check below means something
    size = os.path.getsize(path) + (
        os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0
    )
    assert size <= 1.25 * parameters + FIXED_OVERHEAD, (size, parameters)


def _layer_of(node) -> str | None:  # noqa: ANN001
    """The Sequential index of the layer a node was exported from (exporter metadata)."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            match = re.search(r"/(\d+): factlin\.layer\.FactorizedLinear", prop.value)
            return match.group(1) if match else None
    return None


@pytest.mark.parametrize(("factorization", "implementation"), LAYERS)
def test_each_layer_stores_about_its_parameters(exported, factorization, implementation):
    """Per layer: the constants its nodes read are its parameters (maybe transposed), not a
    product of them (a folded reconstruction would be several times larger)."""
    model, path = exported
    graph = onnx.load(path).graph
    index = str(2 * LAYERS.index((factorization, implementation)))
    sizes = {i.name: math.prod(i.dims) * 4 for i in graph.initializer}
    if not any(_layer_of(node) is not None for node in graph.node):
        pytest.skip("this torch version's exporter records no module of each node")
    read = set()
    for node in graph.node:
        if _layer_of(node) == index:
            read.update(name for name in node.input if name in sizes)
    stored = sum(sizes[name] for name in read)
    layer = model[int(index)]
    parameters = sum(_bytes(p) for p in layer.parameters())
    assert layer.implementation == implementation and layer.factorization == factorization
    assert parameters <= stored <= 1.1 * parameters + 1024, (stored, parameters)


@pytest.mark.parametrize("batch", [1, 13])
def test_onnxruntime_reproduces_the_outputs_at_other_batch_sizes(exported, batch):
    model, path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(batch, WIDTH)
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-5)


def test_export_plans_feed_the_input_through_every_step():
    """Every step of an export plan involves the input's intermediate (no weight-only
    intermediate), for every factorization, with and without a layer mode."""
    for factorization in FACTORIZATIONS:
        for n_layers in (1, 3):
            layer = FactorizedLinear((2, 3, 4, 2), (3, 2, 2, 4), factorization=factorization,
                                     rank=0.5, n_layers=n_layers)  # fmt: skip
            plan = layer.weight._plan("export", n_layers > 1, 256)
            holders = [True] + [False] * (len(plan.equation.split("->")[0].split(",")) - 1)
            for i, j in plan.path:
                assert holders[i] or holders[j], (factorization, n_layers, plan.path)
                holders = [h for k, h in enumerate(holders) if k not in (i, j)] + [True]
