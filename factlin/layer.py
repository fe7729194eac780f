"""``FactorizedLinear``: a drop-in ``nn.Linear`` whose weight is a low-rank tensor."""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._calibrated_init import (
    as_input_stats,
    calibrated_error_fn,
    calibrated_init,
    check_calibration_kwargs,
)
from ._linear_like import build_dense, dense_weight, kind_of_layer, remember_kind
from ._rebuilt_linear import functorch_active
from ._state_dict_check import check_state_dict, record_config
from ._typing import RankSpec, Shape
from ._validation import (
    check_bool,
    check_dtype,
    check_implementation,
    check_input,
    check_int,
    check_layer_index,
    check_tensorized_features,
)
from .cost_model import choose_implementation
from .errors import InputError, ShapeError, describe
from .factorizations import FactorizedWeight, get_factorization, normalize_factorization
from .factorizations._base import batch_bucket, constant_under_compile, exporting_to_onnx
from .input_stats import InputStats, PairedInputStats
from .rank import validate_rank
from .shape_search import choose_tensorized_shape
from .tensorized_shape import get_tensorized_shape
from .tltorch_compat import map_tltorch_keys
from .weight_cache import WeightCache, fully_sharded

__all__ = ["FactorizedLinear", "SubFactorizedLinear"]

#: Set while a layer is built to be filled by a decomposition: skip the random init.
_SKIP_RANDOM_INIT: ContextVar[bool] = ContextVar("factlin_skip_random_init", default=False)


class FactorizedLinear(nn.Module):
    """Linear layer whose weight matrix is tensorized and stored in low-rank form.

    The weight of shape ``(out_features, in_features)`` is viewed as a tensor of shape
    ``out_tensorized_features + in_tensorized_features`` (with a leading ``n_layers`` mode when
    several layers share one factorization) and parametrized in CP, Tucker or TT-matrix form.

    Parameters
    ----------
    in_tensorized_features : tuple of int
        Shape the input features are split into; ``prod(in_tensorized_features)`` is
        ``in_features``.
    out_tensorized_features : tuple of int
        Shape the output features are split into.
    bias : bool, default True
        Whether to learn an additive bias (shape ``(out,)``, or ``(n_layers, out)``).
    factorization : {'cp', 'tucker', 'tt'}, default 'cp'
        Case-insensitive; ``'blocktt'`` and ``'ttm'`` are aliases of ``'tt'``.
    rank : 'same', float, int or tuple of int, default 'same'
        ``'same'``: as many parameters as the dense weight; float ``f``: ``f`` times that; int:
        the CP rank / every Tucker rank / every TT bond rank; tuple: per-mode Tucker ranks or TT
        bond ranks. See :mod:`factlin.rank`. The resolved ranks are in :attr:`rank`.
    implementation : {'factorized', 'reconstructed', 'auto'}, default 'factorized'
        ``'factorized'`` contracts the input with the factors along a planned order (factors
        may meet each other first where that is faster, as in one einsum over all operands);
        ``'reconstructed'`` rebuilds the weight matrix and calls ``F.linear``;
        ``'auto'`` picks one of the two per call from a cost model of the batch size and
        whether gradients are needed (see :mod:`factlin.cost_model`). Can be changed after
        construction.
    n_layers : int, default 1
        Number of linear layers parametrized jointly by one factorized tensor.
    checkpointing : bool, default False
        Recompute the forward during backward (``torch.utils.checkpoint``) in training mode to
        save activation memory.
    device, dtype
        As for ``nn.Linear``; ``dtype`` must be a floating-point type.

    Attributes
    ----------
    in_features, out_features : int
    weight : FactorizedWeight
        The parametrization: ``weight.to_matrix()`` rebuilds the dense matrix.
    bias : torch.nn.Parameter or None
    inference_cache : bool
        When True (default), the ``'reconstructed'`` and ``'auto'`` forwards run without
        autograd reuse the rebuilt matrix while no parameter has changed (see
        :mod:`factlin.weight_cache`). Set to False to save the memory of one dense matrix.
    decomposition_info : dict or None
        Diagnostics of the decomposition that initialized the layer (:meth:`from_linear`).

    Examples
    --------
    >>> layer = FactorizedLinear((8, 8, 12), (8, 16, 24), factorization='tucker', rank=0.1)
    >>> layer(torch.randn(32, 768)).shape
    torch.Size([32, 3072])
    """

    def __init__(
        self,
        in_tensorized_features: Shape,
        out_tensorized_features: Shape,
        bias: bool = True,
        factorization: str = "cp",
        rank: RankSpec = "same",
        implementation: str = "factorized",
        n_layers: int = 1,
        checkpointing: bool = False,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        in_shape = check_tensorized_features("in_tensorized_features", in_tensorized_features)
        out_shape = check_tensorized_features("out_tensorized_features", out_tensorized_features)
        weight_class = get_factorization(factorization)
        validate_rank(rank)
        self._implementation = check_implementation(implementation)
        self.n_layers = check_int("n_layers", n_layers, 1)
        self.checkpointing = check_bool("checkpointing", checkpointing)
        check_bool("bias", bias)
        check_dtype(dtype)

        self.in_tensorized_features: Shape = in_shape
        self.out_tensorized_features: Shape = out_shape
        self.in_features: int = math.prod(in_shape)
        self.out_features: int = math.prod(out_shape)
        self.factorization: str = weight_class.name
        self.inference_cache: bool = True
        self.decomposition_info: Optional[dict] = None
        self._input_rank: RankSpec = rank  # as given (tltorch's input_rank)
        self._weight_cache = WeightCache()
        self._auto_choices: dict[tuple[int, bool, bool, str], str] = {}
        #: Per batch bucket: whether 'reconstructed' training takes the factorized backward.
        self._factorized_backward: dict[int, bool] = {}
        self.weight: FactorizedWeight = weight_class(
            in_shape, out_shape, rank, self.n_layers, device=device, dtype=dtype
        )
        if bias:
            bias_shape = (
                (self.out_features,) if self.n_layers == 1 else (self.n_layers, self.out_features)
            )
            self.bias = nn.Parameter(torch.empty(bias_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if not _SKIP_RANDOM_INIT.get():
            self.reset_parameters()

    # ---- building from trained layers -------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: RankSpec = "same",
        auto_tensorize: bool = True,
        n_tensorized_modes: int = 3,
        in_tensorized_features: Optional[Shape] = None,
        out_tensorized_features: Optional[Shape] = None,
        bias: bool = True,
        factorization: str = "CP",
        implementation: str = "reconstructed",
        checkpointing: bool = False,
        decomposition_kwargs: Optional[dict] = None,
        verbose: bool = False,
        calibration: Optional[torch.Tensor | InputStats | PairedInputStats] = None,
        calibration_kwargs: Optional[dict] = None,
        search_shapes: Optional[bool] = None,
    ) -> FactorizedLinear:
        """Compress a trained ``nn.Linear`` by decomposing its weight.

        Parameters
        ----------
        linear : torch.nn.Linear
            The layer to compress (any module with a 2-D ``weight`` and optional ``bias``; a
            Hugging Face ``Conv1D``'s transposed weight is read as ``(out, in)``, and
            :meth:`to_linear` then gives a ``Conv1D`` back).
        rank : 'same', float, int or tuple of int, default 'same'
            As in the constructor.
        auto_tensorize : bool, default True
            Choose the tensorized shapes; then ``in_tensorized_features`` and
            ``out_tensorized_features`` must be None. With ``search_shapes`` (the default
            for Tucker and TT),
            several foldings of the features are fitted at the parameter budget of ``rank``
            on the balanced folding and the lowest error wins
            (:func:`factlin.shape_search.choose_tensorized_shape`; the calibrated output error
            with ``calibration``); otherwise the balanced
            :func:`factlin.get_tensorized_shape`.
        n_tensorized_modes : int, default 3
            Modes per side when ``auto_tensorize`` (fewer when the sizes do not allow it).
        in_tensorized_features, out_tensorized_features : tuple of int, optional
            Explicit shapes (with ``auto_tensorize=False``); their products must equal the
            linear's ``in_features`` and ``out_features``.
        bias : bool, default True
            Copy the linear's bias when it has one (no bias is invented otherwise).
        factorization : str, default 'CP'
        implementation : str, default 'reconstructed'
        checkpointing : bool, default False
        decomposition_kwargs : dict, optional
            Passed to the decomposition: ``n_iter_max``, ``tol``, ``init``, ``random_state``,
            ``memory_limit_bytes``, ``callback``; for CP also ``line_search``, ``block_size``,
            ``max_seconds`` and ``time_limit_seconds``; for TT ``rel_tol`` (see the README's
            table "Decomposing trained weights").
        verbose : bool, default False
            Log progress through ``logging.getLogger('factlin')``.
        calibration : Tensor, InputStats or PairedInputStats, optional
            Inputs of the layer, ``(*, in_features)``, or their statistics
            (:func:`factlin.collect_input_stats`). Then the factors are fitted to the layer's
            outputs on these inputs instead of to the weight (see
            :mod:`factlin.decompositions.calibrated`): the data-free and a whitened start, the
            better kept, then refined on the exact output error; the bias is corrected for the
            mean error, ``b + (W - W_hat) mean``.
        calibration_kwargs : dict, optional
            With ``calibration``: ``damping`` (default 0.01, relative to the mean input
            energy), ``refine`` (default True), ``n_iter_max`` (refinement iterations, default
            100) and ``tol`` (stop once 10 iterations together improve the output error by
            less than this fraction, default 1e-3).
        search_shapes : bool or None, default None
            With ``auto_tensorize`` and more than one mode per side: choose the folding by fit
            (above). The candidates and their errors are in ``decomposition_info['shapes']``.
            None searches for Tucker and TT (a fit per candidate takes milliseconds to a
            second) and keeps the balanced folding for CP, where each candidate costs a CP-ALS
            run (seconds to minutes on real layers); True searches for CP too, ranking the
            candidates by 3 ALS sweeps, then fitting the best of them and the balanced folding
            in full (about 2-3x the time of one fit).

        Returns
        -------
        FactorizedLinear
            On the linear's device and dtype; ``decomposition_info`` holds the relative error
            of the fit (``rel_error``, of the weight) and the decomposition's diagnostics; with
            ``calibration`` also the relative output errors ``||(W - W_hat) L|| / ||W L||``
            (``L L^T`` the input covariance, or the second moment without a bias):
            ``output_error``, ``output_error_data_free``, ``output_error_whitened``,
            ``output_error_start``, and ``start``, ``refine_iter``, ``seconds``.

        Raises
        ------
        TypeError, ValueError
            Bad arguments, shapes that do not match the weight, a weight with NaN or inf, or a
            decomposition whose estimated memory exceeds the limit; calibration inputs or
            statistics of another size than ``in_features``, or with NaN or inf.
        """
        weight = _linear_weight("linear", linear)
        out_features, in_features = weight.shape
        shape_info: Optional[list[dict]] = None
        auto_tensorize = check_bool("auto_tensorize", auto_tensorize)
        if search_shapes is None:
            search_shapes = normalize_factorization(factorization) != "cp"
        search_shapes = check_bool("search_shapes", search_shapes)
        stats = None
        if calibration is not None:
            stats = [as_input_stats("calibration", calibration, in_features)]
        elif calibration_kwargs is not None:
            raise TypeError(
                "calibration_kwargs configures calibrated fits: pass calibration= too (or drop "
                "calibration_kwargs)"
            )
        if auto_tensorize:
            if in_tensorized_features is not None or out_tensorized_features is not None:
                raise ShapeError(
                    "auto_tensorize=True chooses the tensorized shapes itself: pass "
                    "auto_tensorize=False to use in_tensorized_features="
                    f"{in_tensorized_features} and out_tensorized_features="
                    f"{out_tensorized_features}"
                )
            order = check_int("n_tensorized_modes", n_tensorized_modes, 1)
            in_shape, out_shape = get_tensorized_shape(in_features, out_features, order=order)
            if search_shapes and order > 1 and len(in_shape) > 1:
                _check_finite_weight(weight)
                validate_rank(rank)
                check_decomposition_kwargs(factorization, decomposition_kwargs)
                fit_options = check_calibration_kwargs(calibration_kwargs)
                error_fn = None
                if stats is not None:
                    centered = (
                        check_bool("bias", bias) and getattr(linear, "bias", None) is not None
                    )
                    error_fn = calibrated_error_fn(
                        weight, stats[0], centered, factorization, fit_options["damping"]
                    )
                seed = {
                    k: v for k, v in (decomposition_kwargs or {}).items() if k == "random_state"
                }
                in_shape, out_shape, shape_info = choose_tensorized_shape(
                    weight, factorization, rank, order, error_fn=error_fn,
                    decomposition_kwargs=seed,
                )  # fmt: skip
                rank = next(entry["rank"] for entry in shape_info if entry["chosen"])
        else:
            if in_tensorized_features is None or out_tensorized_features is None:
                raise ShapeError(
                    "auto_tensorize=False needs both in_tensorized_features and "
                    "out_tensorized_features"
                )
            in_shape = _matching_shape(
                "in_tensorized_features", in_tensorized_features, in_features
            )
            out_shape = _matching_shape(
                "out_tensorized_features", out_tensorized_features, out_features
            )
        linear_bias = getattr(linear, "bias", None)
        use_bias = check_bool("bias", bias) and linear_bias is not None
        layer = cls._from_weights(
            weight.reshape(*out_shape, *in_shape),
            linear_bias if use_bias else None,
            in_shape,
            out_shape,
            n_layers=1,
            factorization=factorization,
            rank=rank,
            implementation=implementation,
            checkpointing=checkpointing,
            decomposition_kwargs=decomposition_kwargs,
            verbose=verbose,
            calibration=stats,
            calibration_kwargs=calibration_kwargs,
        )
        remember_kind(layer, linear)  # to_linear() gives a Conv1D back for a Conv1D
        if shape_info is not None and layer.decomposition_info is not None:
            layer.decomposition_info["shapes"] = shape_info
        return layer

    @classmethod
    def from_linear_list(
        cls,
        linear_list: list[nn.Linear],
        in_tensorized_features: Shape,
        out_tensorized_features: Shape,
        rank: RankSpec,
        bias: bool = True,
        factorization: str = "CP",
        implementation: str = "reconstructed",
        checkpointing: bool = False,
        decomposition_kwargs: Optional[dict] = None,
        calibration: Optional[list] = None,
        calibration_kwargs: Optional[dict] = None,
    ) -> FactorizedLinear:
        """Compress several same-shaped linears jointly into one layer with ``n_layers`` modes.

        Their weights are stacked along a leading mode and decomposed together; ``layer[k]``
        approximates ``linear_list[k]``. Biases are stacked when ``bias`` and at least one
        linear has one (a missing bias counts as zeros, so outputs are unchanged).
        ``calibration`` is a list with one entry per linear (inputs or statistics, as in
        :meth:`from_linear`): the fit then minimizes the sum of the layers' output errors.

        Raises
        ------
        TypeError, ValueError
            An empty list, layers of different shapes, dtypes or devices, shapes that do not
            match, or the errors of :meth:`from_linear`.
        """
        if not isinstance(linear_list, (list, tuple, nn.ModuleList)) or len(linear_list) == 0:
            raise TypeError(
                f"linear_list={describe(linear_list)}: expected a non-empty list of nn.Linear"
            )
        weights = [_linear_weight(f"linear_list[{k}]", lin) for k, lin in enumerate(linear_list)]
        first = weights[0]
        for k, weight in enumerate(weights[1:], start=1):
            if weight.shape != first.shape or weight.dtype != first.dtype:
                raise ShapeError(
                    f"linear_list[{k}] has weight {tuple(weight.shape)} {weight.dtype} but "
                    f"linear_list[0] has {tuple(first.shape)} {first.dtype}: all layers must "
                    "have the same shape and dtype"
                )
            if weight.device != first.device:
                raise ShapeError(
                    f"linear_list[{k}] is on {weight.device} but linear_list[0] is on "
                    f"{first.device}"
                )
        out_features, in_features = first.shape
        in_shape = _matching_shape("in_tensorized_features", in_tensorized_features, in_features)
        out_shape = _matching_shape(
            "out_tensorized_features", out_tensorized_features, out_features
        )
        biases = [getattr(lin, "bias", None) for lin in linear_list]
        stacked_bias = None
        if check_bool("bias", bias) and any(b is not None for b in biases):
            stacked_bias = torch.stack(
                [b.detach() if b is not None else first.new_zeros(out_features) for b in biases]
            )
        stats = None
        if calibration is not None:
            if not isinstance(calibration, (list, tuple)) or len(calibration) != len(weights):
                raise TypeError(
                    f"calibration={describe(calibration)}: expected a list of {len(weights)} "
                    "entries (inputs or InputStats), one per linear of linear_list"
                )
            stats = [
                as_input_stats(f"calibration[{k}]", c, in_features)
                for k, c in enumerate(calibration)
            ]
        tensor = torch.stack(weights).reshape(len(weights), *out_shape, *in_shape)
        return cls._from_weights(
            tensor,
            stacked_bias,
            in_shape,
            out_shape,
            n_layers=len(weights),
            factorization=factorization,
            rank=rank,
            implementation=implementation,
            checkpointing=checkpointing,
            decomposition_kwargs=decomposition_kwargs,
            verbose=False,
            calibration=stats,
            calibration_kwargs=calibration_kwargs,
        )

    @classmethod
    def _from_weights(
        cls,
        tensor: torch.Tensor,
        bias: Optional[torch.Tensor],
        in_shape: Shape,
        out_shape: Shape,
        *,
        n_layers: int,
        factorization: str,
        rank: RankSpec,
        implementation: str,
        checkpointing: bool,
        decomposition_kwargs: Optional[dict],
        verbose: bool,
        calibration: Optional[list[InputStats | PairedInputStats]] = None,
        calibration_kwargs: Optional[dict] = None,
    ) -> FactorizedLinear:
        """Build a layer shaped like ``tensor`` and initialize it by decomposing ``tensor``
        (or, with ``calibration``, by the calibrated fit)."""
        if decomposition_kwargs is None:
            decomposition_kwargs = {}
        if not isinstance(decomposition_kwargs, dict):
            raise TypeError(
                f"decomposition_kwargs={describe(decomposition_kwargs)}: expected a dict or None"
            )
        check_bool("verbose", verbose)
        options = check_decomposition_kwargs(factorization, decomposition_kwargs)
        fit_options = check_calibration_kwargs(calibration_kwargs)
        if calibration is not None and "rel_tol" in decomposition_kwargs:
            raise TypeError(
                "decomposition_kwargs['rel_tol'] chooses TT ranks by the weight error, which a "
                "calibrated fit does not minimize: pass a rank (or a budget) with calibration"
            )
        _check_finite_weight(tensor)
        token = _SKIP_RANDOM_INIT.set(True)  # the decomposition sets every parameter
        try:
            layer = cls(
                in_shape,
                out_shape,
                bias=bias is not None,
                factorization=factorization,
                rank=rank,
                implementation=implementation,
                n_layers=n_layers,
                checkpointing=checkpointing,
                device=tensor.device,
                dtype=tensor.dtype,
            )
        finally:
            _SKIP_RANDOM_INIT.reset(token)
        kwargs = dict(decomposition_kwargs)
        if verbose and "verbose" in options:
            kwargs.setdefault("verbose", True)
        if calibration is not None:
            info = calibrated_init(layer, tensor.detach(), bias, calibration, kwargs, fit_options)
        else:
            info = layer.weight.init_from_tensor(tensor.detach(), **kwargs)
            if bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(bias.reshape(layer.bias.shape))
        layer.decomposition_info = info
        return layer

    # ---- configuration ---------------------------------------------------------------------
    @property
    def rank(self) -> Any:
        """The ranks actually used (CP: int; Tucker: one per mode; TT: bonds with boundary 1s)."""
        return self.weight.rank

    # tltorch's attributes (read-only views of the configuration)
    @property
    def tensorized_shape(self) -> Shape:
        """``out_tensorized_features + in_tensorized_features`` (tltorch's attribute; no
        ``n_layers`` mode). The weight's :attr:`~FactorizedWeight.tensor_shape` has it."""
        return self.out_tensorized_features + self.in_tensorized_features

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``, the shape of each layer's matrix (tltorch's)."""
        return (self.out_features, self.in_features)

    @property
    def input_rank(self) -> RankSpec:
        """The ``rank`` argument as given (tltorch's); :attr:`rank` holds the ranks used."""
        return getattr(self, "_input_rank", self.rank)

    @property
    def has_bias(self) -> Any:
        """Whether the layer has a bias (tltorch's): a bool, or one bool per layer when
        ``n_layers > 1`` (tltorch: an array, 0 until ``from_linear_list`` fills it)."""
        present = self.bias is not None
        return present if self.n_layers == 1 else (present,) * self.n_layers

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        self._implementation = check_implementation(value)

    def reset_parameters(self) -> None:
        """Re-initialize like ``nn.Linear``: the rebuilt weight has mean 0 and standard deviation
        ``1 / sqrt(3 * in_features)``; the bias is uniform in ``±1 / sqrt(in_features)``.
        A no-op on the meta device (deferred init: ``to_empty()`` then call this again)."""
        if self.weight_reference.is_meta:
            return
        self.weight.reset_parameters(1.0 / math.sqrt(3 * self.in_features))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, indices: int = 0) -> torch.Tensor:
        """Apply layer ``indices`` to ``x`` of shape ``(*, in_features)``.

        Returns a tensor of shape ``(*, out_features)``.

        Raises
        ------
        TypeError, ValueError
            If ``x`` is not a tensor of the layer's dtype and device with last dimension
            ``in_features``, or ``indices`` is not an int in ``[0, n_layers)``.
        """
        layer = check_layer_index("indices", indices, self.n_layers)
        parameters = self.weight.parameter_tensors()
        check_input(x, self.in_features, parameters[0])
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, layer, use_reentrant=False)
        return self._forward(x, layer, parameters)

    @property
    def weight_reference(self) -> torch.Tensor:
        """One of the weight's parameters (for dtype and device)."""
        return self.weight.parameter_tensors()[0]

    def _forward(
        self, x: torch.Tensor, layer: int, parameters: Optional[list[torch.Tensor]] = None
    ) -> torch.Tensor:
        bias = self.bias
        if bias is not None and self.n_layers > 1:
            bias = bias[layer]
        use_cache = self._use_cache()
        implementation = self._implementation
        if implementation != "factorized" and not use_cache and exporting_to_onnx():
            implementation = "factorized"  # a rebuilt matrix would be folded into the file
        if implementation == "auto":
            implementation = self._resolve_auto(x, use_cache)
        if implementation == "reconstructed":
            if use_cache:
                if parameters is None:
                    parameters = self.weight.parameter_tensors()
                matrix = self._weight_cache.get(
                    layer, parameters, lambda: self.weight.to_matrix(layer)
                )
            elif self._takes_factorized_backward(x):
                y = self.weight.rebuilt_linear(x.reshape(-1, self.in_features), layer, bias)
                if x.dim() == 2:
                    return y
                return _not_a_view(y.reshape(*x.shape[:-1], self.out_features))
            else:
                matrix = self.weight.to_matrix(layer)
            return _not_a_view(F.linear(x, matrix, bias))  # a view for 3-D x
        # (*, in) -> (batch, in) -> (batch, out) -> (*, out)
        y = self.weight.contract(x.reshape(-1, self.in_features), layer)
        y = y.reshape(*x.shape[:-1], self.out_features)
        if bias is None:
            return _not_a_view(y)
        if torch.is_grad_enabled() and fully_sharded():
            return y + bias  # not a view (see _not_a_view)
        # In place: y is the plan's fresh result, which no backward needs (saves one buffer).
        return y.add_(bias)

    def _takes_factorized_backward(self, x: torch.Tensor) -> bool:
        """Whether this 'reconstructed' call with grad on runs its backward through the
        factorized contraction (:mod:`factlin._rebuilt_linear`): where the time model says that
        is cheaper, in eager CPU calls only."""
        if (
            not torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or x.device.type != "cpu"
            or functorch_active()
        ):
            return False
        batch = x.numel() // self.in_features
        if batch == 0:
            return False
        bucket = batch_bucket(batch)
        choice = self._factorized_backward.get(bucket)
        if choice is None:
            choice = self._factorized_backward[bucket] = self.weight.rebuilt_linear_pays(bucket)
        return choice

    def _use_cache(self) -> bool:
        # Never while tracing: a traced graph would hold the cached matrix as a constant.
        return (
            self.inference_cache
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not fully_sharded()
        )

    def _resolve_auto(self, x: torch.Tensor, cached: bool) -> str:
        """What ``'auto'`` runs for ``x``: the cost model's choice for its batch bucket."""
        batch = x.numel() // self.in_features if not torch.compiler.is_compiling() else 0
        grad = torch.is_grad_enabled()
        device = x.device.type  # x is on the parameters' device (checked)
        return self._auto_choice(batch_bucket(batch), grad, cached, device)

    @constant_under_compile
    def _auto_choice(self, bucket: int, grad: bool, cached: bool, device: str) -> str:
        """The cost model's choice, cached per key; outside the graph under ``torch.compile``."""
        key = (bucket, grad, cached, device)
        choice = self._auto_choices.get(key)
        if choice is None:
            choice = choose_implementation(self.weight, bucket, grad=grad, cached=cached)
            self._auto_choices[key] = choice
        return choice

    def clear_cache(self) -> None:
        """Drop the cached rebuilt matrices (they are rebuilt on demand)."""
        self._weight_cache.clear()

    # ---- state_dict --------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        record_config(self, destination, prefix)

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, *args: Any
    ) -> None:
        # tltorch's key names (weight.factors.factor_0, ...) become factlin's; then a
        # state_dict of another factorization, rank or shape fails here, naming what differs.
        tltorch = map_tltorch_keys(state_dict, prefix) is not None
        check_state_dict(self, state_dict, prefix, local_metadata, tltorch=tltorch)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_weight_cache"] = WeightCache()
        return state

    # ---- layers of a joint factorization ------------------------------------------------------
    def get_linear(self, indices: int = 0) -> SubFactorizedLinear:
        """Layer ``indices`` as a module sharing this layer's parameters."""
        return SubFactorizedLinear(self, check_layer_index("indices", indices, self.n_layers))

    def __getitem__(self, indices: int) -> SubFactorizedLinear:
        return self.get_linear(indices)

    def __len__(self) -> int:
        return self.n_layers

    def to_linear(self, indices: int = 0) -> nn.Module:
        """A dense layer with the rebuilt weight (and bias) of layer ``indices``: a plain
        ``nn.Linear``, or a Hugging Face ``Conv1D`` when this layer was built from one."""
        layer = check_layer_index("indices", indices, self.n_layers)
        bias = self.bias
        if bias is not None and self.n_layers > 1:
            bias = bias[layer]
        with torch.no_grad():
            return build_dense(kind_of_layer(self), self.weight.to_matrix(layer), bias)

    def extra_repr(self) -> str:
        parts = [
            f"in_tensorized_features={self.in_tensorized_features}",
            f"out_tensorized_features={self.out_tensorized_features}",
            f"bias={self.bias is not None}",
            f"factorization={self.factorization!r}",
            f"rank={self.rank!r}",
            f"implementation={self._implementation!r}",
        ]
        if self.n_layers != 1:
            parts.append(f"n_layers={self.n_layers}")
        if self.checkpointing:
            parts.append("checkpointing=True")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class SubFactorizedLinear(nn.Module):
    """One layer of a jointly factorized :class:`FactorizedLinear`; shares its parameters."""

    def __init__(self, main: FactorizedLinear, index: int) -> None:
        super().__init__()
        self.main = main
        self.index = index
        self.in_features = main.in_features
        self.out_features = main.out_features

    @property
    def bias(self) -> Optional[torch.Tensor]:
        if self.main.bias is None:
            return None
        return self.main.bias if self.main.n_layers == 1 else self.main.bias[self.index]

    def to_matrix(self) -> torch.Tensor:
        """The rebuilt ``(out_features, in_features)`` weight of this layer."""
        return self.main.weight.to_matrix(self.index)

    def to_linear(self) -> nn.Linear:
        return self.main.to_linear(self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x, self.index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index}, main={self.main!r})"


def _not_a_view(y: torch.Tensor) -> torch.Tensor:
    """``y``, copied when it is a view while FSDP2 is in use and autograd is on: FSDP2 hooks
    its backward (the all-gather) onto a module's output, and an in-place op on a view output
    (``y += residual``) would drop that hook, and the backward would read freed parameters.
    (``nn.Linear`` has that problem: ``F.linear`` returns a view for 3-D inputs with a bias.)"""
    if y._base is not None and torch.is_grad_enabled() and fully_sharded():
        return y.clone()
    return y


def _linear_weight(name: str, linear: object) -> torch.Tensor:
    """The detached 2-D weight of an ``nn.Linear``-like module."""
    weight = getattr(linear, "weight", None)
    if not isinstance(linear, nn.Module) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}={describe(linear)}: expected a torch.nn.Linear")
    if weight.ndim != 2:
        raise ShapeError(f"{name} has a weight of shape {tuple(weight.shape)}; expected 2-D")
    if not weight.is_floating_point():
        raise TypeError(f"{name} has a weight of dtype {weight.dtype}; expected floating point")
    # (out, in): a Hugging Face Conv1D stores its weight transposed
    return dense_weight(linear).detach()


def _matching_shape(name: str, value: object, features: int) -> Shape:
    shape = check_tensorized_features(name, value)
    if math.prod(shape) != features:
        raise ShapeError(
            f"{name}={shape} has product {math.prod(shape)}, but the weight has {features} "
            "features on that side: the product must match"
        )
    return shape


def check_decomposition_kwargs(factorization: str, kwargs: Optional[dict]) -> frozenset:
    """The options the factorization's decomposition takes; raises on any other key."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"decomposition_kwargs={describe(kwargs)}: expected a dict or None")
    options = get_factorization(factorization).decomposition_options
    unknown = sorted(set(kwargs or {}) - options)
    if unknown:
        raise TypeError(
            f"decomposition_kwargs has {', '.join(map(repr, unknown))}, which the "
            f"{normalize_factorization(factorization)!r} decomposition does not take; it "
            f"accepts {', '.join(sorted(options))}"
        )
    return options


def _check_finite_weight(weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise InputError(
            "the weight to decompose contains NaN or inf values; a factorization of it "
            "would be meaningless: clean the layer first"
        )
