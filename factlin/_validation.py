"""Argument checks shared by the layer and the converters. Each raises before any work."""

from __future__ import annotations

import numbers

import torch

from ._typing import Shape
from .errors import FactlinError, InputError, ShapeError, describe

#: Forward implementations a layer accepts.
IMPLEMENTATIONS = ("factorized", "reconstructed", "auto")


def check_int(name: str, value: object, minimum: int) -> int:
    """A Python int ``>= minimum`` (bools rejected, numpy ints accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={describe(value)}: expected an int >= {minimum}")
    if value < minimum:
        raise FactlinError(f"{name}={describe(value)}: expected an int >= {minimum}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={describe(value)}: expected True or False")
    return value


def check_tensorized_features(name: str, value: object) -> Shape:
    """A non-empty tuple of positive Python ints (an int ``n`` is accepted as ``(n,)``)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name}={describe(value)}: expected a tuple of positive ints")
    if len(value) == 0:
        raise ShapeError(f"{name}={describe(value)}: expected a non-empty tuple of positive ints")
    sizes = []
    for size in value:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(
                f"{name}={describe(value)}: every entry must be a positive int, "
                f"got {describe(size)}"
            )
        if size < 1:
            raise ShapeError(
                f"{name}={describe(value)}: every entry must be a positive int, got {size}"
            )
        sizes.append(int(size))
    return tuple(sizes)


def check_implementation(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"implementation={describe(value)}: expected one of {IMPLEMENTATIONS}")
    key = value.strip().lower()
    if key not in IMPLEMENTATIONS:
        raise FactlinError(
            f"implementation={value!r} is not known; expected one of {IMPLEMENTATIONS}"
        )
    return key


def check_dtype(dtype: object) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={describe(dtype)}: expected a torch.dtype or None")
    if not dtype.is_floating_point:
        raise TypeError(
            f"dtype={dtype}: expected a floating-point dtype (float32, float64, float16, bfloat16)"
        )


def check_layer_index(name: str, value: object, n_layers: int) -> int:
    """An int in ``[0, n_layers)`` (0-dim integer tensors accepted)."""
    if type(value) is int and 0 <= value < n_layers:  # the common case, checked first
        return value
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name}={describe(value)}: expected an int layer index in [0, {n_layers - 1}]"
        )
    if not 0 <= value < n_layers:
        raise InputError(
            f"{name}={value} is out of range: this layer parametrizes n_layers={n_layers} "
            f"layer(s), valid indices are 0..{n_layers - 1}"
        )
    return int(value)


def check_input(x: object, in_features: int, reference: torch.Tensor) -> None:
    """``x`` is a tensor of shape ``(*, in_features)`` with ``reference``'s dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x={describe(x)}: expected a torch.Tensor of shape (*, {in_features})")
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ShapeError(
            f"x has shape {tuple(x.shape)}: expected (*, in_features) with "
            f"in_features={in_features}, but its last dimension is "
            f"{x.shape[-1] if x.ndim else 'missing (0-dim tensor)'}"
        )
    if x.dtype != reference.dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but the layer's parameters are {reference.dtype}: "
            f"convert one of them (x.to({reference.dtype}) or layer.to({x.dtype}))"
        )
    if x.device != reference.device:
        raise InputError(
            f"x is on device {x.device} but the layer's parameters are on {reference.device}: "
            "move one of them with .to(device)"
        )
