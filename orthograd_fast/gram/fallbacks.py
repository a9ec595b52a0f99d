"""The whole-model fallbacks of ``SampleGram``, after the backward (DESIGN.md §5).

Parameters of the root fallback (assign.py: root-module parameters, tied weights, and
parameters the safety net rerouted) are served, per step, by

* ``fallback:traced``: the op tracer (rules/traced.py), started with the step's hooks,
  followed them op by op in the forward; each row is differentiated through just the
  ops that use them. A traced parameter whose probe then fails goes to the rerun;
* ``fallback:rerun``: the recorded call of the whole model is re-run per row
  (rules/fallback.py, ``per_row_grads``).

Both give per-row gradients that ``segment_results`` sums into Grams and per-segment
gradients. A probe mismatch after the rerun is an error: then no per-row decomposition of
the gradient exists (a loss term of no row, coupled rows), and no Gram is returned.
"""
from __future__ import annotations

from .capture import _Step
from .rules.fallback import per_row_grads, segment_results
from .rules.traced import traced_row_grads


class Fallbacks:
    """Mixin of ``SampleGram`` (engine.py): the root fallback's orchestration.

    Uses ``self.model``, ``self._tracked``, ``self._opts``, the rule table (assign.py) and
    the probe checks (safety.py).
    """

    def _root_fallback(self, step: _Step, traced: list[str]) -> None:
        """Root-level parameters: from the op tracer when it could follow them (rules/traced.py),
        else by re-running the model per row; a mismatch after that is an error."""
        names = list(self._root.params)
        rerun = [g for g in names if g not in traced]
        tracer = step.tracer
        if traced and tracer is not None and tracer.problem is None:
            self._fresh_probes(step, traced)
            rows = traced_row_grads(tracer, {g: self._tracked[g] for g in traced})
            grams, seg_grads = segment_results(rows, step.seg, self._opts, step.probes)
            step.grams.update(grams)
            step.seg_grads.update(seg_grads)
            rerun += self._bad(step, traced)
            for g in traced:
                self._root_how[g] = "traced" if g not in rerun else "rerun"
        else:
            rerun = names
        if not rerun:
            return
        for g in rerun:
            self._root_how[g] = "rerun"
        calls = step.calls.get(self._root, [])
        if not calls:
            if not any(step.probes[g].seen_autograd for g in rerun):
                return
            why = "; ".join(sorted({self._reasons[g] for g in rerun}))
            if tracer is not None and tracer.problem:
                why += f"; the op tracer could not follow them: {tracer.problem}"
            raise ValueError(
                f"SampleGram: parameters {sorted(rerun)} need the exact whole-model fallback ({why}), "
                "which re-runs the model per row, but the model given to SampleGram was not called "
                "inside record(); call it (model(x)) inside the context"
            )
        self._check_versions(self._root, calls)
        self._fresh_probes(step, rerun)
        rows = per_row_grads(self.model, {g: g for g in rerun}, calls, step.seg.N)
        grams, seg_grads = segment_results(rows, step.seg, self._opts, step.probes)
        step.grams.update(grams)
        step.seg_grads.update(seg_grads)
        bad = self._bad(step, rerun)
        if bad:
            raise ValueError(
                f"SampleGram: the gradient of {bad} is not the sum of per-row gradients of the "
                "model output: the loss has a term that belongs to no row (e.g. weight decay added "
                "to the loss: put it in the optimizer), rows interact (BatchNorm in train mode, "
                "attention across the batch), or the batch is not in dim 0. No Gram is returned."
            )
