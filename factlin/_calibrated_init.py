"""Initializing a :class:`~factlin.FactorizedLinear` by a calibrated fit: the layer-side steps
(argument checks, the bias correction, the diagnostics) around
:func:`factlin.decompositions.calibrated.calibrated_fit`."""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Callable, Optional

import torch

from .decompositions.calibrated import (
    DEFAULT_REFINE_ITER,
    DEFAULT_REFINE_TOL,
    OutputObjective,
    calibrated_fit,
    whitened_error,
)
from .errors import FactlinError, ShapeError, describe
from .input_stats import DEFAULT_DAMPING, InputStats, PairedInputStats

__all__ = ["as_input_stats", "calibrated_error_fn", "calibrated_init", "check_calibration_kwargs"]

_DEFAULTS: dict[str, Any] = {
    "damping": DEFAULT_DAMPING,
    "refine": True,
    "n_iter_max": DEFAULT_REFINE_ITER,
    "tol": DEFAULT_REFINE_TOL,
}


def check_calibration_kwargs(options: Optional[dict]) -> dict:
    """``calibration_kwargs`` completed with the defaults, every entry checked."""
    if options is None:
        return dict(_DEFAULTS)
    if not isinstance(options, dict):
        raise TypeError(f"calibration_kwargs={describe(options)}: expected a dict or None")
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(
            f"calibration_kwargs has {', '.join(map(repr, unknown))}; expected some of "
            f"{', '.join(map(repr, _DEFAULTS))}"
        )
    out = {**_DEFAULTS, **options}
    if not isinstance(out["refine"], bool):
        raise TypeError(f"calibration_kwargs['refine']={describe(out['refine'])}: expected a bool")
    n_iter = out["n_iter_max"]
    if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral):
        raise TypeError(
            f"calibration_kwargs['n_iter_max']={describe(n_iter)}: expected an int >= 0"
        )
    if n_iter < 0:
        raise FactlinError(f"calibration_kwargs['n_iter_max']={n_iter}: expected an int >= 0")
    for key in ("damping", "tol"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"calibration_kwargs[{key!r}]={describe(value)}: expected a number")
        if not math.isfinite(value) or value < 0:
            raise FactlinError(
                f"calibration_kwargs[{key!r}]={value}: expected a finite number >= 0"
            )
    out["n_iter_max"] = int(n_iter)
    return out


def as_input_stats(
    name: str, calibration: object, in_features: int
) -> InputStats | PairedInputStats:
    """Inputs ``(*, in_features)`` or statistics, checked against the layer's size."""
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim == 0 or calibration.shape[-1] != in_features:
            raise ShapeError(
                f"{name} has shape {tuple(calibration.shape)}: expected inputs (*, "
                f"{in_features}), the layer's in_features"
            )
        return InputStats.from_inputs(calibration, name=name)
    if isinstance(calibration, (InputStats, PairedInputStats)):
        if calibration.in_features != in_features:
            raise ShapeError(
                f"{name} holds statistics of {calibration.in_features} features, but the layer "
                f"has in_features={in_features}"
            )
        return calibration
    raise TypeError(
        f"{name}={describe(calibration)}: expected a tensor of inputs (*, {in_features}), an "
        "InputStats or a PairedInputStats"
    )


@torch.no_grad()
def calibrated_init(
    layer: Any,
    tensor: torch.Tensor,
    bias: Optional[torch.Tensor],
    stats: list[InputStats | PairedInputStats],
    decomposition_kwargs: dict,
    options: dict,
) -> dict:
    """Fit ``layer.weight`` to the outputs of the weights ``tensor`` under ``stats`` (one per
    layer), then set the bias to ``b + W mean - W_hat mean'``; return the diagnostics."""
    tic = time.perf_counter()
    n_layers = layer.n_layers
    weights = tensor.reshape(n_layers, layer.out_features, layer.in_features)
    centered = bias is not None  # a bias absorbs the mean error: fit the covariance
    objective = OutputObjective.for_weights(weights, stats, centered, options["damping"])
    info = calibrated_fit(
        layer.weight,
        objective,
        decomposition_kwargs=decomposition_kwargs,
        damping=options["damping"],
        refine=options["refine"],
        n_iter_max=options["n_iter_max"],
        tol=options["tol"],
    )
    fitted = layer.weight.to_matrix().reshape(weights.shape)
    if bias is not None:
        # a copy: ``bias`` may be the linear's own parameter (float64: .to() would not copy)
        biases = bias.reshape(n_layers, layer.out_features).to(torch.float64, copy=True)
        w, w_hat = weights.to(torch.float64), fitted.to(torch.float64)
        for k, s in enumerate(stats):
            dense = s.dense if isinstance(s, PairedInputStats) else s
            seen = s.compressed if isinstance(s, PairedInputStats) else s
            mean, mean_seen = dense.mean.to(w.device), seen.mean.to(w.device)
            biases[k] += w[k] @ mean - w_hat[k] @ mean_seen
        layer.bias.copy_(biases.reshape(layer.bias.shape).to(layer.bias.dtype))
    norm = float(torch.linalg.vector_norm(weights.to(torch.float64)))
    diff = float(torch.linalg.vector_norm((weights - fitted).to(torch.float64)))
    info["rel_error"] = diff / norm if norm > 0 else 0.0
    info["seconds"] = time.perf_counter() - tic
    return info


#: Decomposition settings of the quick fits that compare candidates (shapes, ranks).
QUICK_KWARGS: dict[str, dict] = {"tucker": {"n_iter_max": 2}, "cp": {"n_iter_max": 10}, "tt": {}}


def calibrated_error_fn(
    weight: torch.Tensor,
    stats: InputStats | PairedInputStats,
    centered: bool,
    factorization: str,
    damping: float,
) -> Callable[[tuple, tuple, Any], tuple[float, int]]:
    """``error_fn(in_shape, out_shape, rank) -> (output error, params)`` for the shape search:
    the relative output error of the quick whitened fit (no refinement) under ``stats``."""
    from .factorizations import get_factorization, normalize_factorization

    name = normalize_factorization(factorization)
    weight_class = get_factorization(name)
    objective = OutputObjective.for_weights(weight.detach()[None], [stats], centered, damping)

    def error_fn(in_shape: tuple, out_shape: tuple, rank: Any) -> tuple[float, int]:
        fitted = weight_class(in_shape, out_shape, rank, dtype=weight.dtype, device=weight.device)
        error = whitened_error(fitted, objective, damping, QUICK_KWARGS.get(name, {}))
        return error, fitted.num_parameters()

    return error_fn
