"""Which rule serves each tracked parameter of a ``SampleGram`` (DESIGN.md §5).

At construction (``SampleGram.__init__``) every tracked parameter is assigned once to

* the rule of the module that owns it (``rules/``, registered by module type); a rule
  that claims its subtree (``Rule.claims_subtree``, e.g. nn.MultiheadAttention) also takes
  the parameters of the modules below it;
* a ``ModuleFallback`` of its module (``fallback:module(path)``) when no rule serves that
  module type or the rule refuses this configuration (``Rule.unsupported``);
* the root fallback (``_root``, fallbacks.py): parameters of the root module itself and
  parameters shared by several modules (tied).

The safety net (safety.py) may later move a parameter to the root fallback (``_to_root``).
``_reasons`` holds why a parameter is not served by its own rule (shown by ``coverage()``).
"""
from __future__ import annotations

import torch
from torch import nn

from .rules import ModuleFallback, Rule, rule_class_for


class Assignment:
    """Mixin of ``SampleGram`` (engine.py): the parameter -> rule table.

    Uses ``self.model`` and ``self._tracked``; sets ``_rules`` ({id(module): Rule}),
    ``_root`` (the whole-model fallback), ``_reasons`` and ``_root_how``.
    """

    def _resolve_params(self, params) -> dict[str, nn.Parameter]:
        named = list(self.model.named_parameters())
        if params is None:
            return {n: p for n, p in named if p.requires_grad}
        if isinstance(params, torch.Tensor):
            params = [params]
        wanted = list(params)
        by_id = {id(p): n for n, p in named}
        out = {}
        for p in wanted:
            if id(p) not in by_id:
                raise ValueError("SampleGram: a tensor in params is not a parameter of model")
            if not p.requires_grad:
                raise ValueError(f"SampleGram: parameter {by_id[id(p)]!r} has requires_grad=False")
            out[by_id[id(p)]] = p
        return {n: p for n, p in named if n in out}

    def _build_rules(self) -> None:
        """Assign every tracked parameter to a rule, a module fallback or the root fallback."""
        model = self.model
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        modules = list(model.named_modules())
        for path, m in modules:
            for local, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((path, m, local))
        claimers = [
            (path, m)
            for path, m in modules
            if (cls := rule_class_for(m)) is not None and cls.claims_subtree
        ]
        self._rules: dict[int, Rule] = {}
        self._root = ModuleFallback(model, "", {})
        self._reasons: dict[str, str] = {}
        self._root_how: dict[str, str] = {}

        def add(module, path, cls, local, gname):
            key = id(module)
            if key not in self._rules:
                self._rules[key] = cls(module, path, {})
            self._rules[key].params[local] = gname

        for gname, p in self._tracked.items():
            own = owners[id(p)]
            if len(own) > 1:
                where = ", ".join(repr(o[0] + "." + o[2] if o[0] else o[2]) for o in own)
                self._to_root(gname, f"tied: shared by {where}")
                continue
            path, m, local = own[0]
            claim = next(
                ((cp, cm) for cp, cm in claimers if cp == "" or path == cp or path.startswith(cp + ".")),
                None,
            )
            if claim is not None:
                cp, cm = claim
                sub = path if cp == "" else path[len(cp) + 1 :]
                add(cm, cp, rule_class_for(cm), f"{sub}.{local}" if sub else local, gname)
                continue
            cls = rule_class_for(m)
            reason = None if cls is None else cls.unsupported(m)
            if cls is not None and reason is None:
                add(m, path, cls, local, gname)
            elif m is model:
                self._to_root(gname, "parameter of the root module, used in its forward")
            else:
                why = reason or f"no rule for {type(m).__name__}"
                add(m, path, ModuleFallback, local, gname)
                self._reasons[gname] = why

    def _to_root(self, gname: str, reason: str) -> None:
        self._root.params[gname] = gname
        self._reasons[gname] = reason

    def _rule_list(self) -> list[Rule]:
        return list(self._rules.values())
