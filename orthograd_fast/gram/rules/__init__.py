"""SampleGram's per-layer rules, one module each, registered by module type.

``base`` holds the registry (``register_rule``, ``rule_class_for``) and the rule interface;
importing this package registers every rule below. A module type without a rule is served
by the exact ``torch.func`` fallback (``fallback.ModuleFallback``).
"""
from . import attention, conv, embedding, fallback, hf_conv1d, linear, norm, traced  # noqa: F401  (registration)
from .base import GramOptions, Probe, Rule, Segments, register_rule, rule_class_for
from .fallback import ModuleFallback

__all__ = ["GramOptions", "ModuleFallback", "Probe", "Rule", "Segments", "register_rule", "rule_class_for"]
