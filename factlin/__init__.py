"""factlin: tensorized (factorized) linear layers for PyTorch.

A pure-PyTorch take on TensorLy-Torch's ``FactorizedLinear``: CP, Tucker and TT-matrix weights on
plain ``nn.Parameter``s, a rank solver, and a forward pass that contracts the input with the
factors through a contraction order planned once.
"""

from .convert import ConversionReport, LayerRecord, tensorize_model, untensorize_model
from .decompositions import MemoryLimitError
from .errors import FactlinError, InputError, RankError, ShapeError
from .factorizations import FACTORIZATIONS, CPWeight, FactorizedWeight, TTWeight, TuckerWeight
from .layer import FactorizedLinear, SubFactorizedLinear
from .tensorized_shape import get_tensorized_shape, tensorize_dim

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
    "tensorize_model",
    "untensorize_model",
    "ConversionReport",
    "LayerRecord",
    "MemoryLimitError",
    "tensorize_dim",
    "FactlinError",
    "RankError",
    "ShapeError",
    "InputError",
    "__version__",
]
