"""The per-sample Gram engine (DESIGN.md §2, §5): ``SampleGram`` and its per-layer rules."""
from .engine import NonFiniteGramError, SampleGram
from .rules import register_rule

__all__ = ["NonFiniteGramError", "SampleGram", "register_rule"]
