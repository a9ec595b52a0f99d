"""transformers' Conv1D (GPT-2's attention and MLP projections) served by its own rule
(orthograd_fast/gram/rules/hf_conv1d.py), against the fp64 batch-size-1 loop.

Conv1D's weight is (in, out), the transpose of nn.Linear's, so every piece of the rule
that touches the weight's layout (kept tiles, ``segment_grads``, combine, the rank-1
probe) must come out in (in, out) order; the Gram alone would not notice. Checked on:

* a stock GPT2LMHeadModel (tests/hf_models.py) in fp64 and fp32, with ``record_grads`` True
  and False (detached weights), methods ghost and explicit, segments with ignored rows and
  an empty segment ("mixed") or one segment per row with N == T ("row_per_segment"): Grams
  global and per tensor, ``.grad`` after record(), ``segment_grads``, combine (global and
  per-tensor weights). The step must raise no RuntimeWarning and leave every Conv1D tensor
  on the rule: a probe in the wrong orientation would fail and reroute the weight to the
  (exact) fallback, which the Grams alone would not show;
* a small model of Conv1D layers whose rows are in dim 0 of a 3-D input, in dim 1 of a
  time-major one (T == N) and in a 2-D input (T = 1), in store and stream mode;
* an OrthoGrad step on GPT-2 (orthogonal to every fp64 retain gradient);
* refusals: a subclass of Conv1D, and a class with Conv1D's name and module whose forward
  is not x W + b, go to the exact fallback; a Conv1D weight also used outside its module is
  caught by the probe and rerouted, still exact; importing orthograd_fast imports no
  transformers.

Tolerances as tests/test_sample_gram_hf.py (derived there): fp64 1e-10, fp32 1e-4.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import hf_models as H
from orthograd_fast import reference as ref
from orthograd_fast.gram import SampleGram
from orthograd_fast.gram.rules import rule_class_for
from orthograd_fast.gram.rules.hf_conv1d import HFConv1DRule
from orthograd_fast.orthograd import OrthoGrad
from test_sample_gram import ce_sum, reference_segments
from test_sample_gram_hf import (  # noqa: F401  (one_thread: the module's autouse fixture)
    DTYPES,
    TOL,
    TextWrapper,
    _lm_rows,
    assert_combine,
    assert_grams,
    assert_tensors,
    build,
    one_thread,
    reference,
    rel,
    seed_torch,
    segments_for,
)
from transformers.pytorch_utils import Conv1D

# peft 0.21 calls a transformers 5.x method that transformers deprecates (not ours to fix)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def conv1d_params(model: nn.Module) -> dict[str, str]:
    """{param name: 'weight' or 'bias'} of every exact Conv1D of the model."""
    return {f"{path}.{local}": local for path, m in model.named_modules() if type(m) is Conv1D
            for local, _ in m.named_parameters(recurse=False)}


def detached(sg) -> set[str]:
    """Names whose weight the last step read detached (capture.py)."""
    return {g for rule in sg._rule_list() for g in rule.skipped}


def assert_segment_grads(sg, gs, tol):
    got = sg.segment_grads()
    dense = {}
    for n, (X, index) in got.items():
        numel = gs[n][0].numel()
        if index is not None:
            X = X.new_zeros((X.shape[0], numel)).index_copy_(1, index, X)
        assert X.shape == (gs[n].shape[0], numel), n
        dense[n] = X.reshape(gs[n].shape)
    assert_tensors(dense, gs, tol, "segment_grads")


# --------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------
def test_gpt2_conv1d_is_served_by_the_rule():
    model, _, _ = H.gpt2()
    convs = conv1d_params(model)
    assert len(convs) == 16  # c_attn, c_proj, mlp.c_fc, mlp.c_proj of 2 blocks, weight and bias
    for path, m in model.named_modules():
        if type(m) is Conv1D:
            assert rule_class_for(m) is HFConv1DRule and HFConv1DRule.unsupported(m) is None
    cov = SampleGram(model).coverage()
    assert {n: cov[n] for n in convs} == {n: "hf_conv1d" for n in convs}
    assert not [n for n, how in cov.items() if how.startswith("fallback:module")], cov


@pytest.mark.parametrize("layout", ["mixed", "row_per_segment"])
@pytest.mark.parametrize("method", ["ghost", "explicit"])
@pytest.mark.parametrize("record_grads", [True, False])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_gpt2_exact(dname, record_grads, method, layout, gen):
    dtype, tol = DTYPES[dname], TOL[DTYPES[dname]]
    N, seg, S = segments_for("gpt2", layout, gen)
    model, batch, loss_fn = build("gpt2", dtype, N, gen)
    per_row, _, _ = reference(model, batch, loss_fn)
    gs = ref.segment_grads(per_row, seg, S)
    summed = {n: g.sum(0) for n, g in per_row.items()}  # every row, ignored ones too
    convs = conv1d_params(model)
    weights = {n for n, local in convs.items() if local == "weight"}

    sg = SampleGram(model, method=method, record_grads=record_grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed probe reroutes with a warning
        with sg.record(seg, num_segments=S):
            loss_fn(H.forward(model, batch), batch).sum().backward()
    cov = sg.coverage()
    want = {n: f"hf_conv1d:{method}" if local == "weight" else "hf_conv1d:bias" for n, local in convs.items()}
    assert {n: cov[n] for n in convs} == want

    # which weights ran detached (capture.py, "Detached weights"): with record_grads only
    # those whose explicit Gram keeps the tiles, when no row is ignored
    all_kept = layout == "row_per_segment"
    assert detached(sg) == (weights if not record_grads or (method == "explicit" and all_kept) else set())
    params = dict(model.named_parameters())
    if record_grads:  # .grad is a plain backward's
        assert_tensors({n: params[n].grad for n in summed}, summed, tol, ".grad after record()")
    else:
        assert all(params[n].grad is None for n in weights)
        rest = {n: g for n, g in summed.items() if n not in weights}
        assert_tensors({n: params[n].grad for n in rest}, rest, tol, ".grad after record()")

    assert_grams(sg, gs, tol)
    assert_segment_grads(sg, gs, tol)
    assert_combine(sg, model, gs, S, gen, tol, per_tensor=False)
    assert_combine(sg, model, gs, S, gen, tol, per_tensor=True)
    sg.close()


def test_orthograd_step_on_gpt2(gen):
    """fp32 OrthoGrad step (alpha = 0, global; its engine reads every Conv1D weight
    detached): Conv1D stays on its rule, and the parameter change is orthogonal to every
    fp64 per-sample retain gradient, max |cos| <= 1e-5 (test_sample_gram_hf's bound), while
    the unprojected forget gradient is not (> 1e-2; one forget row duplicates a retain row)."""
    B, Fn = 4, 3
    model, batch, _ = build("gpt2", torch.float32, B + Fn, gen)
    x, y = batch["input_ids"].clone(), batch["targets"].clone()
    x[B], y[B] = x[0], y[0]
    wrapped = TextWrapper(model)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]

    w64 = copy.deepcopy(wrapped).double()
    retain, _ = ref.per_sample_grads_rows(
        w64, lambda out, row: _lm_rows(out, row["y"]), {"x": x[:B], "y": y[:B]}, call=lambda m, row: m(row["x"]),
    )
    G = torch.cat([retain[n].reshape(B, -1) for n in names], 1)  # [B, P] fp64
    p64 = dict(w64.named_parameters())
    forget = torch.autograd.grad(_lm_rows(w64(x[B:]), y[B:]).mean(), [p64[n] for n in names])
    g_u = torch.cat([g.reshape(-1) for g in forget])

    def max_cos(v):
        return float(((G @ v).abs() / (G.norm(dim=1) * v.norm())).max())

    assert max_cos(g_u) > 1e-2
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with OrthoGrad(wrapped, opt, loss_fn=_lm_rows) as og:
            og.step((x[B:], y[B:]), (x[:B], y[:B]))
            cov = og.engine.coverage()
    convs = conv1d_params(wrapped)
    assert all(cov[n].startswith("hf_conv1d:") for n in convs), {n: cov[n] for n in convs}
    after = dict(wrapped.named_parameters())
    delta = torch.cat([(after[n].detach() - before[n]).double().reshape(-1) for n in names])
    print(f"max |cos| of the parameter change with a retain gradient {max_cos(delta):.3g}")
    assert delta.norm() > 0
    assert max_cos(delta) <= 1e-5, max_cos(delta)


# --------------------------------------------------------------------------------------
# rows in different places
# --------------------------------------------------------------------------------------
class Conv1DStack(nn.Module):
    """Conv1D layers on x (N, T, 5): rows in dim 0 of a 3-D input, in dim 1 of a time-major
    (T, N, 6) input, and a 2-D (N, 4) input (one position per row)."""

    def __init__(self):
        super().__init__()
        self.a = Conv1D(6, 5)  # nf = 6, nx = 5
        self.b = Conv1D(4, 6)
        self.c = Conv1D(3, 4)
        for m in (self.a, self.b, self.c):  # O(1) weights and biases (the stock init is 0.02 and 0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)

    def forward(self, x):
        h = torch.tanh(self.a(x))  # [N, T, 6]
        h = torch.tanh(self.b(h.transpose(0, 1).contiguous()))  # [T, N, 4] (its forward views x)
        return self.c(h.mean(0))  # [N, 3]


@pytest.mark.parametrize("method", ["auto", "ghost", "explicit"])
@pytest.mark.parametrize("mode,record_grads", [("store", True), ("store", False), ("stream", True)])
def test_conv1d_rows_anywhere(mode, record_grads, method, gen):
    """N == T == 5, so only the row model (gram/rows.py) tells the time-major layer's rows
    from its positions; segments with ignored rows and an empty segment."""
    seed_torch(gen)
    model = Conv1DStack().double()
    N = 5
    x = torch.randn(N, N, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    seg, S = torch.tensor([0, -1, 2, 0, 1])[torch.randperm(N, generator=gen)], 4
    gs = reference_segments(model, x, y, seg, S)
    sg = SampleGram(model, method=method, mode=mode, record_grads=record_grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with sg.record(seg, num_segments=S):
            ce_sum(model(x), y).backward()
    assert all(how.startswith("hf_conv1d:") for how in sg.coverage().values()), sg.coverage()
    assert_grams(sg, gs, 1e-10)
    if mode == "store":
        assert_segment_grads(sg, gs, 1e-10)
        assert_combine(sg, model, gs, S, gen, 1e-10, per_tensor=False)
        assert_combine(sg, model, gs, S, gen, 1e-10, per_tensor=True)


def test_precision_high_fp32(gen):
    """precision='high' gives the explicit tiles fp64 products (matrix.gram_explicit sets the
    rows' compute dtype): still W's layout."""
    seed_torch(gen)
    model = Conv1DStack()
    x = torch.randn(6, 5, 5, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    seg, S = torch.tensor([0, 1, 1, 2, 2, 0]), 3
    gs = reference_segments(model, x, y, seg, S)
    sg = SampleGram(model, method="explicit", precision="high")
    with sg.record(seg, num_segments=S):
        ce_sum(model(x), y).backward()
    assert_grams(sg, gs, 1e-4)
    assert_segment_grads(sg, gs, 1e-4)
    assert_combine(sg, model, gs, S, gen, 1e-4, per_tensor=False)


# --------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------
class SubConv1D(Conv1D):
    """A subclass: may change forward, so it is not matched (here it does not)."""


class Doubled(nn.Module):
    """Conv1D's name and module path, but y = 2 (x W + b): refused by the forward check."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return 2 * (x @ self.weight + self.bias)


Doubled.__module__ = "transformers.pytorch_utils"
Doubled.__name__ = Doubled.__qualname__ = "Conv1D"


def test_subclass_and_other_forward_go_to_fallback(gen):
    seed_torch(gen)
    model = nn.Sequential(SubConv1D(4, 3), nn.Tanh(), Doubled(2, 4)).double()
    assert rule_class_for(model[0]) is None
    assert rule_class_for(model[2]) is HFConv1DRule
    assert "does not compute x @ weight + bias" in HFConv1DRule.unsupported(model[2])
    sg = SampleGram(model)
    cov = sg.coverage()
    assert cov["0.weight"] == "fallback:module(0) (no rule for SubConv1D)", cov
    assert cov["2.weight"].startswith("fallback:module(2) (its forward does not compute"), cov
    x = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64)
    seg, S = torch.tensor([0, 1, 1, 2, -1, 0]), 3

    def loss(out):
        return out.square().sum()

    m64 = copy.deepcopy(model)
    per_row = ref.per_sample_grads_rows(m64, lambda out, row: loss(out), {"x": x}, call=lambda m, row: m(row["x"]))[0]
    gs = ref.segment_grads(per_row, seg, S)
    with sg.record(seg, num_segments=S):
        loss(model(x)).backward()
    assert_grams(sg, gs, 1e-10)


class Reused(nn.Module):
    """A Conv1D whose weight is also used outside the module: y = c(x) + x W."""

    def __init__(self):
        super().__init__()
        self.c = Conv1D(4, 4)
        nn.init.normal_(self.c.weight)

    def forward(self, x):
        return torch.tanh(self.c(x) + x @ self.c.weight).sum(1)  # [N, 4]


@pytest.mark.parametrize("record_grads", [True, False])
def test_outside_use_is_caught_and_rerouted(record_grads, gen):
    """The gradient that reaches W from outside Conv1D is not in the rule's rows: the probe
    fails (record_grads=True; with the weight detached, any gradient autograd delivers is
    from outside), the weight is moved to the exact fallback with a warning, the Gram stays
    exact, and the bias stays on the rule."""
    seed_torch(gen)
    model = Reused().double()
    x = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=gen)
    seg, S = torch.tensor([0, 1, 2, 0, 1, 2, 3]), 4
    gs = reference_segments(model, x, y, seg, S)
    sg = SampleGram(model, method="explicit", record_grads=record_grads)
    with pytest.warns(RuntimeWarning, match="c.weight"):
        with sg.record(seg, num_segments=S):
            ce_sum(model(x), y).backward()
    cov = sg.coverage()
    assert cov["c.weight"].startswith("fallback:") and cov["c.bias"] == "hf_conv1d:bias", cov
    assert_grams(sg, gs, 1e-10)
    assert_combine(sg, model, gs, S, gen, 1e-10, per_tensor=False)


def test_orthograd_fast_does_not_import_transformers():
    code = "import sys, orthograd_fast, orthograd_fast.gram; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
