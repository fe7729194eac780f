"""Fit the GPU cost profile of ``'auto'`` (:data:`factlin.cost_model.GPU`) to measured times.

Reads the JSON that ``gpu_forward.py --out FILE`` writes (per row: the measured times and the
plans' step counts, FLOPs and elements written), fits the three cost lines of
:class:`factlin.cost_model.GPUProfile` by non-negative least squares on relative error, prints
them as Python, and scores the choices they lead to: for each row, the measured time of the
chosen implementation over the faster of the two, in-sample, with each (layer, modes,
factorization) left out of the fit in turn, with the constants factlin ships, and as ``'auto'``
chose them in the run.

    python benchmarks/fit_gpu_profile.py results/gpu.json

Needs scipy (``pip install scipy``; the ``demo`` extra brings it).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

#: Bytes per element of the benchmark's float32 rows.
ITEMSIZE = 4


def _plan(row: dict, kind: str, grad: bool) -> np.ndarray:
    plan = row["plans"][f"{kind}_{'grad' if grad else 'nograd'}"]
    return np.array([1.0, plan["n_steps"], plan["flops"], plan["elements_written"] * ITEMSIZE])


def _dense(row: dict) -> np.ndarray:
    """A dense ``F.linear``, counted as a one-step plan (no fixed call cost of its own)."""
    n_in, n_out = row["layer"]
    batch = row["batch"]
    written = n_in * n_out + batch * (n_in + n_out)
    return np.array([0.0, 1.0, 2.0 * batch * n_in * n_out, written * ITEMSIZE])


#: Each cost line: the measured column it explains, and its features (call, steps, FLOPs, bytes).
LINES = {
    "inference": [
        ("fwd", "factorized", lambda r: _plan(r, "contract", False)),
        ("fwd", "dense", lambda r: _dense(r) + np.array([1.0, 0, 0, 0])),
    ],
    "factorized_training": [("fb", "factorized", lambda r: _plan(r, "contract", True))],
    "reconstructed_training": [
        ("fb", "reconstructed", lambda r: _plan(r, "tensor", True) + _dense(r))
    ],
}


def fit(rows: list[dict]) -> dict[str, np.ndarray]:
    from scipy.optimize import nnls

    constants = {}
    for name, sources in LINES.items():
        features = np.array([feature(r) for r in rows for _, _, feature in sources])
        times = np.array([r[phase][column] * 1e-3 for r in rows for phase, column, _ in sources])
        weights = 1.0 / times  # relative error
        constants[name], _ = nnls(features * weights[:, None], times * weights)
    return constants


def choices(row: dict, constants: dict[str, np.ndarray]) -> tuple[str, str]:
    """What the fitted profile picks for the row: no-grad with the inference cache, training."""
    inference = constants["inference"]
    cached_dense = (_dense(row) + np.array([1.0, 0, 0, 0])) @ inference
    forward = _plan(row, "contract", False) @ inference
    factorized = _plan(row, "contract", True) @ constants["factorized_training"]
    rebuilt = (_plan(row, "tensor", True) + _dense(row)) @ constants["reconstructed_training"]
    return (
        "factorized" if forward <= cached_dense else "reconstructed",
        "factorized" if factorized <= rebuilt else "reconstructed",
    )


def score(rows: list[dict], picked: list[tuple[str, str]]) -> str:
    parts = []
    for phase, index in (("fwd", 0), ("fb", 1)):
        ratios = [
            row[phase][pick[index]] / min(row[phase]["factorized"], row[phase]["reconstructed"])
            for row, pick in zip(rows, picked)
        ]
        mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        above = sum(r > 1.15 for r in ratios)
        parts.append(
            f"{phase}: geomean {mean:.3f}, worst {max(ratios):.2f}, {above}/{len(ratios)} > 1.15"
        )
    return "; ".join(parts)


def _group(row: dict) -> tuple:
    return (*row["layer"], row.get("modes", 3), row["factorization"])


def _library_profile() -> dict[str, np.ndarray]:
    """The constants factlin ships (:data:`factlin.cost_model.GPU`), as :func:`fit` returns."""
    from factlin.cost_model import GPU

    return {
        name: np.array([c.per_call, c.per_step, c.per_flop, c.per_byte])
        for name, c in ((name, getattr(GPU, name)) for name in LINES)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="JSON written by gpu_forward.py --out")
    args = parser.parse_args()
    with open(args.results) as file:
        data = json.load(file)
    rows = data["rows"]
    constants = fit(rows)
    print(f"# fitted on {data['device']}, torch {data['torch']}, {len(rows)} rows")
    for name, (call, step, flop, byte) in constants.items():
        print(
            f"{name}=GPUCosts(per_call={call:.3g}, per_step={step:.3g}, "
            f"per_flop={flop:.3g}, per_byte={byte:.3g}),"
        )
    print("in-sample choices:", score(rows, [choices(r, constants) for r in rows]))
    shipped = _library_profile()
    print("choices of factlin.cost_model.GPU:", score(rows, [choices(r, shipped) for r in rows]))
    groups = sorted({_group(r) for r in rows})
    held_out: list = [None] * len(rows)
    for group in groups:
        fitted = fit([r for r in rows if _group(r) != group])
        for i, row in enumerate(rows):
            if _group(row) == group:
                held_out[i] = choices(row, fitted)
    print("held-out choices (each layer and factorization left out of its fit):",
          score(rows, held_out))  # fmt: skip
    taken = [(row["auto"]["fwd"], row["auto"]["fb"]) for row in rows]
    full = {"f": "factorized", "r": "reconstructed"}
    if all(t in full for pair in taken for t in pair):
        print("choices 'auto' made in the run:",
              score(rows, [(full[a], full[b]) for a, b in taken]))  # fmt: skip


if __name__ == "__main__":
    main()
