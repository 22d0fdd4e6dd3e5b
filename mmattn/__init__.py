"""mmattn: training-free attention interventions for diffusers pipelines and transformers VLMs."""

from importlib.metadata import PackageNotFoundError, version

from .api import Handle, apply
from .configs import ACT, PAG, PAI, SEG, SLG, STG, VAR, VHR, DivPrune, FastV, PyramidDrop, SoftPAG, SparseVLM, VisionZip, ZeroTuning
from .windows import FreeSwim, Radial, SlidingTiles, Window1D, Window2D, Window3D, WindowAttention, window_attention

try:
    __version__ = version("mmattn")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# Processor modules register the installers that apply() dispatches to.
from .processors import perturbation as _perturbation  # noqa: E402,F401
from .processors import pruning as _pruning  # noqa: E402,F401
from .processors import sinks as _sinks  # noqa: E402,F401
from .processors import windows as _windows  # noqa: E402,F401

__all__ = ["apply", "Handle", "FastV", "PyramidDrop", "SparseVLM", "DivPrune", "VisionZip", "PAG", "SEG", "SLG", "STG", "SoftPAG", "ZeroTuning", "VAR", "PAI", "ACT", "VHR",
           "Window1D", "Window2D", "Window3D", "SlidingTiles", "Radial", "WindowAttention", "FreeSwim",
           "window_attention", "__version__"]
