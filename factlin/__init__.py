"""factlin: tensorized (factorized) linear layers for PyTorch.

A pure-PyTorch take on TensorLy-Torch's ``FactorizedLinear``: CP, Tucker and TT-matrix weights on
plain ``nn.Parameter``s, a rank solver, and a forward pass that contracts the input with the
factors through a contraction order planned once.
"""

from .calibration import CalibrationError, collect_input_stats
from .convert import ConversionReport, LayerRecord, tensorize_model, untensorize_model
from .decompositions import MemoryLimitError, TimeLimitError
from .errors import FactlinError, InputError, RankError, ShapeError
from .factorizations import FACTORIZATIONS, CPWeight, FactorizedWeight, TTWeight, TuckerWeight
from .input_stats import InputStats, PairedInputStats
from .layer import FactorizedLinear, SubFactorizedLinear
from .pretrained import PretrainedError, from_pretrained, save_pretrained
from .shape_search import candidate_shapes, choose_tensorized_shape
from .tensorized_shape import get_tensorized_shape, tensorize_dim
from .tltorch_compat import TLTORCH_ONLY_NAMES, convert_tltorch_state_dict, tltorch_only_name_error

__version__ = "0.1.0"

__all__ = [
    "FactorizedLinear",
    "SubFactorizedLinear",
    "FactorizedWeight",
    "CPWeight",
    "TuckerWeight",
    "TTWeight",
    "FACTORIZATIONS",
    "get_tensorized_shape",
    "choose_tensorized_shape",
    "candidate_shapes",
    "tensorize_model",
    "untensorize_model",
    "ConversionReport",
    "LayerRecord",
    "MemoryLimitError",
    "TimeLimitError",
    "tensorize_dim",
    "InputStats",
    "PairedInputStats",
    "collect_input_stats",
    "CalibrationError",
    "save_pretrained",
    "from_pretrained",
    "PretrainedError",
    "convert_tltorch_state_dict",
    "FactlinError",
    "RankError",
    "ShapeError",
    "InputError",
    "__version__",
]


def __getattr__(name: str) -> object:
    """``factlin.FactorizedEmbedding`` and tltorch's other names: an ``AttributeError`` that
    says factlin provides ``FactorizedLinear`` and its tools, not the rest of tltorch."""
    if name in TLTORCH_ONLY_NAMES:
        raise tltorch_only_name_error(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
