"""The safety net of ``SampleGram``: a Gram is exact or refused, never silently wrong.

Each step, every tracked parameter gets a random rank-1 probe uᵀ(·)w of its
summed gradient: the rule's Σ over all rows against the gradient autograd delivered to the
parameter (a tensor hook). A parameter whose gradient also came from elsewhere (used
functionally outside its module, tied, a loss term on the weights) fails the probe; it is
moved, with a warning, to the whole-model fallback (that step) and to the tracer (later
steps), which are exact if the model's rows are independent and the loss is a sum over
rows; if even that does not add up, a ValueError explains. A wrong Gram is never returned
silently. For a detached weight (capture.py) the check is exact instead of probabilistic: its
own layer gives autograd nothing, so any gradient autograd delivers to it came from
outside; the layer's own part is then added to the probe's autograd side, so that the
fallback is checked against what autograd's full gradient would have been.

A BatchNorm in train mode couples the rows: it is refused when called inside
``record()`` (``_check_bn``). The probe vectors are drawn once per engine from a private
generator (rules.base.Probe has the contraction and the rounding allowance).
"""
from __future__ import annotations

import warnings
from functools import partial

import torch

from .capture import _Step
from .rules import Probe, Rule
from .rules.base import probe_shape
from .rules.norm import batchnorm_problem

# rounding allowance multipliers of the probe check (rules.base.Probe)
_RULE_SLACK = 64.0
_FALLBACK_SLACK = 1024.0


class SafetyNet:
    """Mixin of ``SampleGram`` (engine.py): probes, their check, and rerouting a parameter
    whose probe failed.

    Uses ``self._tracked``, ``self._bn`` and the rule table (assign.py); sets
    ``_probe_vectors``.
    """

    def _make_probe_vectors(self) -> dict[str, tuple]:
        """One random unit rank-1 probe (u, w, w's factors, casts) per parameter (rules.base.Probe),
        drawn from a private generator (the global RNG is untouched)."""
        gen = torch.Generator().manual_seed(0x5A3)

        def unit(k):
            v = torch.randn(k, generator=gen, dtype=torch.float64)
            return v / v.norm().clamp_min(1e-300)

        sizes = {}
        for rule in self._rule_list():
            for local, g in rule.params.items():
                sizes[g] = rule.probe_factors(local)
        out = {}
        for gname, p in self._tracked.items():
            m, n = probe_shape(p)
            factors = tuple(unit(k) for k in sizes.get(gname, ()))
            if factors:
                w = factors[0]
                for f in factors[1:]:
                    w = torch.kron(w, f)
            else:
                w = unit(n)
            out[gname] = (unit(m), w, factors, {})  # {} : casts of u, w (Probe.cast)
        return out

    def _install_safety(self, step: _Step) -> None:
        """The step's BatchNorm checks, probes and parameter-gradient hooks."""
        for path, m in self._bn:
            step.handles.append(m.register_forward_pre_hook(partial(self._check_bn, step, path)))
        for gname, p in self._tracked.items():
            step.grad_was_none[gname] = p.grad is None
            u, w, factors, cast = self._probe_vectors[gname]
            step.probes[gname] = Probe(u, w, factors, cast=cast)
            step.handles.append(p.register_hook(partial(self._on_param_grad, step, gname)))

    def _check_bn(self, step: _Step, path: str, module, args):
        if not step.active:
            return
        problem = batchnorm_problem(module)
        if problem is not None:
            raise ValueError(
                f"SampleGram: BatchNorm {path!r} {problem}; per-sample gradients need independent "
                "rows. Call .eval() on norm layers (e.g. model.eval()) before record()."
            )

    def _on_param_grad(self, step: _Step, gname: str, g: torch.Tensor):
        if not step.active:
            return
        step.any_grad = True
        pr = step.probes[gname]
        pr.autograd += pr.contract(g.to_dense() if g.is_sparse else g)
        pr.seen_autograd = True

    def _probe_detached(self, step: _Step, rule: Rule, calls) -> None:
        """Weights the rule's calls read detached. If autograd still delivered a gradient
        (from outside the layer: the parameter will be rerouted), add the layer's part to
        the probe's autograd side too, so that it holds what autograd's full gradient would
        have given (the fallback checks against it)."""
        for gname in rule.skipped:
            pr = step.probes[gname]
            if pr.seen_autograd:
                fresh = {g: Probe(q.u, q.w, q.w_factors) for g in rule.params.values() for q in [step.probes[g]]}
                skipped, rule.skipped = rule.skipped, set()
                try:
                    rule.probe(calls, step.seg, fresh, step.tiles)
                finally:
                    rule.skipped = skipped
                pr.autograd += fresh[gname].engine

    def _failed_probes(self, step: _Step, rules: list[Rule]) -> list[str]:
        """Parameters (not in the root fallback) whose probe failed: to be rerouted."""
        skipped = {g for rule in rules for g in rule.skipped}
        moved = []
        floor = self._probe_floor(step)  # once per step (it was once per parameter: O(P²) calls)
        for gname, pr in step.probes.items():
            if gname in self._root.params:
                continue
            if gname in skipped:  # any gradient autograd delivered came from outside the layer
                if pr.seen_autograd:
                    moved.append(gname)
                continue
            slack = _FALLBACK_SLACK if gname in step.seg_grads else _RULE_SLACK
            if pr.mismatch(torch.finfo(self._tracked[gname].dtype).eps, slack, floor):
                moved.append(gname)
        return moved

    @staticmethod
    def _probe_floor(step: _Step) -> float:
        """The largest probe scale of the step (rules.base.Probe.mismatch's floor)."""
        return max((pr.scale() for pr in step.probes.values()), default=0.0)

    def _reroute(self, gname: str, step: _Step) -> None:
        """Move a parameter whose probe failed to the whole-model fallback (sticky)."""
        where = "<unknown>"
        for rule in self._rule_list():
            for local, g in list(rule.params.items()):
                if g == gname:
                    del rule.params[local]
                    where = rule.path or "<root>"
        step.grams.pop(gname, None)
        step.seg_grads.pop(gname, None)
        step.tiles.pop(gname, None)
        for rule in self._rule_list():
            rule.skipped.discard(gname)
            rule.forced.discard(gname)
        self._to_root(gname, f"gradient from outside its module {where!r} (used functionally or tied)")
        warnings.warn(
            f"SampleGram: parameter {gname!r} received gradient that the hooks of its module "
            f"{where!r} did not see (used functionally outside it, or tied); it is now served by "
            "the exact fallback (slower).",
            RuntimeWarning,
            stacklevel=4,
        )

    def _fresh_probes(self, step: _Step, names) -> None:
        for g in names:
            pr = step.probes[g]
            step.probes[g] = Probe(
                pr.u, pr.w, pr.w_factors, autograd=pr.autograd, seen_autograd=pr.seen_autograd, cast=pr.cast
            )

    def _bad(self, step: _Step, names) -> list[str]:
        floor = self._probe_floor(step)
        return [
            g for g in names
            if step.probes[g].mismatch(torch.finfo(self._tracked[g].dtype).eps, _FALLBACK_SLACK, floor)
        ]
