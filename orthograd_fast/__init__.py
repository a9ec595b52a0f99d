"""orthograd_fast: OrthoGrad unlearning made fast.

Public API (DESIGN.md §5): ``project_orthogonal``, ``SampleGram``, ``OrthoGrad``, ``unlearn``
(with its ``UnlearnResult`` and ``StopRule``).
The core (projection, linalg, gram/, orthograd, reference) lives here; the unlearning
toolkit built on it (methods, data sets, models, metrics, CLI) in ``unlearning/``.
Importing never touches CUDA and works without Triton (torch backend only).
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _attach_source_kernels() -> None:
    """From a source checkout that was not pip-installed (PYTHONPATH=repo), map the
    top-level ``kernels/`` folder to ``orthograd_fast.kernels`` as setup.py does."""
    if _ilu.find_spec(__name__ + ".kernels") is not None:
        return
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(src, "__init__.py")
    if _os.path.isfile(init):
        spec = _ilu.spec_from_file_location(__name__ + ".kernels", init, submodule_search_locations=[src])
        module = _ilu.module_from_spec(spec)
        _sys.modules[spec.name] = module
        spec.loader.exec_module(module)


_attach_source_kernels()

from .gram import SampleGram  # noqa: E402
from .linalg import default_rtol  # noqa: E402
from .orthograd import OrthoGrad  # noqa: E402
from .projection import project_orthogonal  # noqa: E402
from .unlearning import StopRule, UnlearnResult, unlearn  # noqa: E402

__all__ = ["project_orthogonal", "SampleGram", "OrthoGrad", "unlearn", "UnlearnResult", "StopRule", "default_rtol"]
__version__ = "0.1.0"
