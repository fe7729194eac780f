"""The outcome of a whole-model conversion: one :class:`LayerRecord` per linear layer, and the
:class:`ConversionReport` that collects them (see :func:`factlin.tensorize_model`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ._typing import Shape

__all__ = ["ConversionReport", "LayerRecord", "rank_str", "shape_str"]


@dataclass
class LayerRecord:
    """What happened to one linear layer.

    Attributes
    ----------
    name : str
        Qualified name of the layer (the first one when it is registered under several).
    aliases : tuple of str
        Its other qualified names (same module object), empty when it has only one.
    shape : tuple of int
        ``(out_features, in_features)``.
    in_tensorized_features, out_tensorized_features : tuple of int or None
        The tensorized shapes (None when the layer was skipped before they were chosen).
    factorization : str or None
        Canonical factorization name of the new layer (None when skipped).
    rank : int, tuple of int or None
        The resolved ranks of the new layer (None when skipped).
    params_before, params_after : int
        Parameters of the module before and after (equal when skipped); the bias is included.
    rel_error : float or None
        Relative Frobenius error of the weight's decomposition.
    output_error : float or None
        With calibration: the relative output error on the calibration inputs,
        ``||(W - W_hat) L|| / ||W L||`` (``L L^T`` the inputs' covariance; in sequential
        conversion, against the dense model's outputs given the compressed model's inputs).
    output_error_data_free : float or None
        With calibration: the same error of the data-free decomposition at the same ranks.
    note : str or None
        Anything else worth knowing (e.g. a layer no calibration input reached, fitted
        data-free).
    seconds : float
        Time spent decomposing this layer.
    skipped : str or None
        Why the layer was left as it was; None when it was converted.
    """

    name: str
    shape: tuple[int, int]
    params_before: int
    params_after: int
    aliases: tuple[str, ...] = ()
    in_tensorized_features: Optional[Shape] = None
    out_tensorized_features: Optional[Shape] = None
    factorization: Optional[str] = None
    rank: Any = None
    rel_error: Optional[float] = None
    seconds: float = 0.0
    skipped: Optional[str] = None
    output_error: Optional[float] = None
    output_error_data_free: Optional[float] = None
    note: Optional[str] = None

    @property
    def converted(self) -> bool:
        return self.skipped is None

    @property
    def compression(self) -> float:
        """``params_before / params_after``."""
        return self.params_before / max(1, self.params_after)

    def to_dict(self) -> dict:
        """Plain Python values (JSON-serializable): the fields plus ``compression``."""
        out = asdict(self)
        for key in ("shape", "aliases", "in_tensorized_features", "out_tensorized_features"):
            if out[key] is not None:
                out[key] = list(out[key])
        if isinstance(out["rank"], tuple):
            out["rank"] = list(out["rank"])
        out["converted"] = self.converted
        out["compression"] = self.compression
        return out


@dataclass
class ConversionReport:
    """The outcome of :func:`tensorize_model`: one record per linear layer, and totals.

    Attributes
    ----------
    layers : list of LayerRecord
        In the order of ``model.named_modules()``.
    seconds : float
        Wall time of the whole conversion.
    model_params_before, model_params_after : int
        Parameters of the whole model (linear or not) before and after.
    refinement : dict or None
        With ``refine_steps``: ``loss_before``, ``loss_after``, ``steps``, ``seconds``,
        ``kept`` (see :func:`factlin.refine.refine_converted`).
    """

    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    model_params_before: int = 0
    model_params_after: int = 0
    refinement: Optional[dict] = None

    @property
    def converted(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.converted]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.converted]

    @property
    def params_before(self) -> int:
        """Parameters of all linear layers (converted or not) before the conversion."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the same layers afterwards."""
        return sum(r.params_after for r in self.layers)

    @property
    def compression(self) -> float:
        """``params_before / params_after`` over the linear layers."""
        return self.params_before / max(1, self.params_after)

    def __getitem__(self, name: str) -> LayerRecord:
        for record in self.layers:
            if name == record.name or name in record.aliases:
                return record
        raise KeyError(f"no linear layer named {name!r} in this report")

    def to_dict(self) -> dict:
        """Plain Python values (JSON-serializable)."""
        return {
            "layers": [r.to_dict() for r in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "compression": self.compression,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "seconds": self.seconds,
            "n_converted": len(self.converted),
            "n_skipped": len(self.skipped),
            "refinement": self.refinement,
        }

    def __str__(self) -> str:
        header = ("layer", "out x in", "tensorized (out | in)", "rank", "params", "after",
                  "ratio", "rel err", "out err", "sec", "note")  # fmt: skip
        rows = [header]
        for r in self.layers:
            name = r.name or "(model)"
            if r.aliases:
                name += " = " + ", ".join(r.aliases)
            shapes = (
                f"{shape_str(r.out_tensorized_features)} | {shape_str(r.in_tensorized_features)}"
                if r.in_tensorized_features is not None
                else "-"
            )
            rows.append((
                name,
                f"{r.shape[0]}x{r.shape[1]}",
                shapes,
                "-" if r.rank is None else rank_str(r.rank),
                f"{r.params_before:,}",
                f"{r.params_after:,}",
                f"{r.compression:.2f}x",
                "-" if r.rel_error is None else f"{r.rel_error:.3g}",
                "-" if r.output_error is None else f"{r.output_error:.3g}",
                f"{r.seconds:.2f}",
                f"skipped: {r.skipped}" if r.skipped is not None else (r.note or ""),
            ))  # fmt: skip
        widths = [max(len(row[k]) for row in rows) for k in range(len(header) - 1)]
        numeric = {4, 5, 6, 7, 8, 9}
        lines = []
        for row in rows:
            cells = [
                row[k].rjust(widths[k]) if k in numeric else row[k].ljust(widths[k])
                for k in range(len(widths))
            ]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"{len(self.converted)} of {len(self.layers)} linear layers converted: "
            f"{self.params_before:,} -> {self.params_after:,} parameters "
            f"({self.compression:.2f}x); whole model {self.model_params_before:,} -> "
            f"{self.model_params_after:,}; {self.seconds:.2f} s"
        )
        if self.refinement is not None:
            r = self.refinement
            lines.append(
                f"refinement: {r['steps']} steps, distillation loss {r['loss_before']:.4g} -> "
                f"{r['loss_after']:.4g}{'' if r['kept'] else ' (no gain: undone)'}, "
                f"{r['seconds']:.2f} s"
            )
        return "\n".join(lines)


def shape_str(shape: Optional[Shape]) -> str:
    return "x".join(str(n) for n in shape) if shape else "-"


def rank_str(rank: Any) -> str:
    if isinstance(rank, tuple):
        return "(" + ",".join(str(r) for r in rank) + ")"
    return str(rank)
