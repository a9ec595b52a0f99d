"""orthograd_fast: OrthoGrad unlearning made fast.

Public API (DESIGN.md §5): ``project_orthogonal``, ``SampleGram``, ``OrthoGrad``, ``unlearn``.
Importing never touches CUDA and works without Triton (torch backend only).
"""
from .linalg import default_rtol
from .projection import project_orthogonal

__all__ = ["project_orthogonal", "default_rtol"]
__version__ = "0.1.0"
