"""Regression tests of the new-user report's findings 6-9 (notes/newuser-findings.md).

Each test failed before its fix: a torch error from deep inside the model, a silently
wrong reading of a batch, or a refusal that named neither the cause nor the way out.

Exactness (finding 8) is checked on an fp64 model against the fp64 per-sample gradients
of each retain row run alone, unpadded (batch size 1), so the test sees how the batch is
read (masks, padding, which tensor is the target: a wrong reading is off by 1e-2 or
more), not fp32 rounding. Bound on max |cos(Δθ, g_i)|: the solve goes through the Gram,
whose condition number is κ² (κ = σ_max/σ_min of the row-normalised retain gradients,
from the reference; a random tiny BERT's reach 4e3, its classifier dominating), so its
rounding is u·κ², plus the rounding of θ − lr·g, u·‖θ‖/‖Δθ‖; measured over 40 draws at
most 3·u·κ², the test allows 100·u·(κ² + ‖θ‖/‖Δθ‖).
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from orthograd_fast import OrthoGrad, SampleGram, unlearn

FREEZE = {"forget_target": None}  # step budget only


def _seed(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))


def _mlp(classes=4):
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, classes))


def _data(gen, n, classes=4, dtype=torch.float32):
    return torch.randn(n, 10, generator=gen, dtype=dtype), torch.randint(0, classes, (n,), generator=gen)


def _loader(x, y, bs=8):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------- finding 7: bad input named

@pytest.mark.parametrize("model_dtype,data_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_unlearn_data_dtype_mismatch_is_named_before_any_change(gen, model_dtype, data_dtype):
    model = _mlp().to(model_dtype)
    original = copy.deepcopy(model)
    x, y = _data(gen, 24, dtype=data_dtype)
    for method in ("orthograd", "neggrad"):
        with pytest.raises(ValueError, match=f"forget loader, batch 0: the inputs are {data_dtype} but the model's"):
            unlearn(model, _loader(x[:16], y[:16]), _loader(x[16:], y[16:]), method=method, steps=1)
        assert _same(model, original)
    with pytest.raises(ValueError, match=f"retain loader, batch 0: the inputs are {data_dtype}"):
        unlearn(model, _loader(x[:16], y[:16]), _loader(x[16:], y[16:]), method="retrain", epochs=1)
    assert _same(model, original)


def test_bad_class_targets_are_named_before_any_change(gen):
    model = _mlp()
    original = copy.deepcopy(model)
    x, y = _data(gen, 24)
    cases = [
        (y[:, None], r"targets of shape \(8, 1\).*y\.squeeze\(1\)"),
        (torch.where(torch.arange(24) == 19, 7, y), r"target 7 \(row 3\) is outside the model's 4 classes \[0, 4\)"),
        (y.bool(), "class indices"),
    ]
    for yy, msg in cases:
        with pytest.raises(ValueError, match=msg):
            unlearn(model, _loader(x[:16], yy[:16]), _loader(x[16:], yy[16:]), steps=1, stop=FREEZE)
        assert _same(model, original)
    # a bad label in the first retain batch: refused before the first step changes anything
    yr = y.clone()
    yr[2] = -1
    with pytest.raises(ValueError, match=r"target -1 \(row 2\)"):
        unlearn(model, _loader(x[:16], yr[:16]), _loader(x[16:], y[16:]), steps=1, stop=FREEZE)
    assert _same(model, original)


def test_binary_logits_with_the_default_loss_are_refused(gen):
    model = _mlp(classes=1)
    original = copy.deepcopy(model)
    x, y = _data(gen, 24, classes=2)
    with pytest.raises(ValueError, match="binary_cross_entropy_with_logits"):
        unlearn(model, _loader(x[:16], y[:16]), _loader(x[16:], y[16:]), steps=1, stop=FREEZE)
    assert _same(model, original)
    og = OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="one logit per row"):
        og.step((x[16:], y[16:]), (x[:16], y[:16]))
    og.close()
    assert _same(model, original)


def test_orthograd_step_names_bad_targets_by_their_batch(gen):
    model = _mlp()
    original = copy.deepcopy(model)
    og = OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1))
    xr, yr = _data(gen, 6)
    xf, yf = _data(gen, 3)
    yf[1] = 9
    with pytest.raises(ValueError, match=r"target 9 \(forget row 1\)"):
        og.step((xf, yf), (xr, yr))
    with pytest.raises(ValueError, match=r"y\.squeeze\(1\)"):
        og.step((xf, yf[:, None].clamp(max=3)), (xr, yr[:, None]))
    yr_ignored = yr.clone()
    yr_ignored[0] = -100  # F.cross_entropy's ignore_index: a zero-loss row, allowed here
    og.step((xf, yf.clamp(max=3)), (xr, yr_ignored))
    og.close()
    assert not _same(model, original)


# ---------------------------------------------------------------- finding 8: multi-input models

def _bert(gen):
    import transformers as T

    _seed(gen)
    return T.BertForSequenceClassification(T.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3))


def _padded(gen, n, T=10):
    """Right-padded rows of random lengths: ids (n, T), mask (n, T), labels (n,), lengths."""
    lens = torch.randint(3, T + 1, (n,), generator=gen)
    lens[0] = T
    mask = (torch.arange(T) < lens[:, None]).long()
    ids = torch.randint(3, 64, (n, T), generator=gen) * mask
    return ids, mask, torch.randint(0, 3, (n,), generator=gen), lens


def _unpadded_grads(model, ids, labels, lens):
    """(n, P) fp64 per-sample gradients, each row run alone at its own length (eval mode)."""
    m64 = copy.deepcopy(model).double().eval()
    G = []
    for i in range(ids.shape[0]):
        m64.zero_grad()
        F.cross_entropy(m64(input_ids=ids[i:i + 1, :lens[i]]).logits, labels[i:i + 1]).backward()
        G.append(torch.cat([p.grad.reshape(-1) for p in m64.parameters()]))
    return torch.stack(G)


def _assert_orthogonal(G, model, before):
    """max |cos(Δθ, g_i)| within the module docstring's bound."""
    d = torch.cat([(p.detach() - t).double().reshape(-1) for p, t in zip(model.parameters(), before)])
    theta = torch.cat([t.double().reshape(-1) for t in before])
    assert float(d.norm()) > 0
    sv = torch.linalg.svdvals(G / G.norm(dim=1, keepdim=True))
    u = torch.finfo(torch.float64).eps / 2
    tol = 100 * u * (float(sv[0] / sv[-1]) ** 2 + float(theta.norm() / d.norm()))
    cos = float(((G @ d).abs() / (G.norm(dim=1) * d.norm())).max())
    assert cos <= tol, (cos, tol)


@pytest.mark.parametrize("form", ["unlearn-dict", "unlearn-tuple", "orthograd-dict"])
def test_sequence_classification_with_masks_is_exact(gen, form):
    """BERT sequence classification with attention masks: a collator's dict with labels
    (model(**rest)), grouped inputs ((ids, mask), labels) (model(ids, mask)), and the same
    dict straight into OrthoGrad.step. The step is orthogonal to the fp64 gradients of the
    retain sequences run unpadded (fp64: module docstring)."""
    model = _bert(gen).double()
    ids, mask, lab, lens = _padded(gen, 7)
    fids, fmask, flab, _ = _padded(gen, 3)
    G = _unpadded_grads(model, ids, lab, lens)
    before = [p.detach().clone() for p in model.parameters()]
    retain = {"input_ids": ids, "attention_mask": mask, "labels": lab}
    forget = {"input_ids": fids, "attention_mask": fmask, "labels": flab}
    if form == "unlearn-tuple":
        retain, forget = ((ids, mask), lab), ((fids, fmask), flab)
    if form == "orthograd-dict":
        with OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.05), max_grad_norm=1.0) as og:
            og.step(forget, retain)
    else:
        unlearn(model, [retain], [forget], steps=1, lr=0.05, stop=FREEZE)
    _assert_orthogonal(G, model, before)


def test_flat_batches_of_three_tensors_are_refused(gen):
    """TensorDataset(ids, mask, labels): the mask was read as the targets."""
    model = _bert(gen)
    original = copy.deepcopy(model)
    ids, mask, lab, _ = _padded(gen, 6)
    loader = DataLoader(TensorDataset(ids, mask, lab), batch_size=6)
    with pytest.raises(ValueError, match=r"batch of 3 elements.*\(\(ids, mask\), labels\)"):
        unlearn(model, loader, loader, steps=1, stop=FREEZE)
    with OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1)) as og:
        with pytest.raises(ValueError, match="forget batch: a batch of 3 elements"):
            og.step((ids, mask, lab), (ids, mask, lab))
    assert _same(model, original)


def test_dict_batches_of_different_lengths_name_the_fix(gen):
    model = _bert(gen)
    ids, mask, lab, _ = _padded(gen, 6)
    forget = {"input_ids": ids[:, :8], "attention_mask": mask[:, :8], "labels": lab}
    retain = {"input_ids": ids, "attention_mask": mask, "labels": lab}
    with pytest.raises(ValueError, match=r"input 'input_ids' differs.*\(8,\).*\(10,\).*padding='max_length'"):
        unlearn(model, [retain], [forget], steps=1, stop=FREEZE)
    with pytest.raises(ValueError, match="without 'labels'.*task='lm'"):
        unlearn(model, [{"input_ids": ids}], [forget], steps=1, stop=FREEZE)


def test_dict_output_with_logits_takes_the_default_loss(gen):
    """The docstring said a dict holding the logits works; now it does."""

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return {"logits": self.net(x)}

    _seed(gen)
    model = DictOut()
    x, y = _data(gen, 24)
    res = unlearn(model, _loader(x[:16], y[:16]), _loader(x[16:], y[16:]), steps=1, stop=FREEZE,
                  return_result=True)
    assert res.steps == 1 and res.history[0]["forget_acc"] is not None


# ---------------------------------------------------------------- finding 9

def test_compiled_modules_are_refused_up_front(gen):
    m = _mlp()
    x, y = _data(gen, 6)
    with pytest.raises(ValueError, match="compiled modules are not supported"):
        SampleGram(torch.compile(m, backend="eager"))
    inner = nn.Sequential(torch.compile(_mlp(), backend="eager"))
    with pytest.raises(ValueError, match="module '0' is a torch.compile wrapper"):
        SampleGram(inner)
    sg = SampleGram(m)
    compiled = torch.compile(m, backend="eager")
    with pytest.raises(ValueError, match="called through torch.compile inside record"):
        with sg.record(torch.arange(6)):
            F.cross_entropy(compiled(x), y).backward()
    m2 = _mlp()
    sg2 = SampleGram(m2)
    m2.compile(backend="eager")  # in place, after construction
    with pytest.raises(ValueError, match="compiled in place"):
        with sg2.record(torch.arange(6)):
            pass
    with pytest.raises(ValueError, match="compiled modules are not supported"):
        unlearn(torch.compile(_mlp(), backend="eager"), _loader(x, y), _loader(x, y), steps=1)


def test_reentrant_checkpointing_names_the_fix(gen):
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(10, 12), nn.Linear(12, 12), nn.Linear(12, 4)
            self.reentrant = reentrant

        def forward(self, x):
            h = checkpoint(lambda t: torch.tanh(self.b(t)), self.a(x), use_reentrant=self.reentrant)
            return self.c(h)

    _seed(gen)
    x, y = _data(gen, 6)
    with pytest.raises(ValueError, match=r"use_reentrant=True.*use_reentrant=False"):
        sg = SampleGram(Net(True))
        with sg.record(torch.arange(6)):
            F.cross_entropy(sg.model(x), y, reduction="sum").backward()
    sg = SampleGram(Net(False))  # the way out works
    with sg.record(torch.arange(6)):
        F.cross_entropy(sg.model(x), y, reduction="sum").backward()
    assert sg.gram().shape == (6, 6)


def test_optimizer_callable_of_wrong_arity_is_named(gen):
    model = _mlp()
    original = copy.deepcopy(model)
    x, y = _data(gen, 24)
    with pytest.raises(ValueError, match=r"cannot be called as optimizer\(params, lr\)"):
        unlearn(model, _loader(x[:16], y[:16]), _loader(x[16:], y[16:]), steps=1,
                optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert _same(model, original)
    unlearn(model, _loader(x[:16], y[:16]), _loader(x[16:], y[16:]), steps=1, stop=FREEZE,
            optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr))
    assert not _same(model, original)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_orthograd_step_without_grad_mode_is_refused(gen, ctx):
    model = _mlp()
    x, y = _data(gen, 9)
    with OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1)) as og, ctx():
        with pytest.raises(ValueError, match=f"under torch.{ctx.__name__}"):
            og.step((x[:3], y[:3]), (x[3:], y[3:]))


def test_nan_rows_are_named_in_the_batch_passed(gen):
    model = _mlp()
    original = copy.deepcopy(model)
    xr, yr = _data(gen, 12)
    xf, yf = _data(gen, 6)
    xf[[1, 4], 2] = float("nan")
    with OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1)) as og:
        with pytest.raises(ValueError, match=r"forget batch: the inputs hold NaN or Inf \(rows \[1, 4\]\)"):
            og.step((xf, yf), (xr, yr))
    assert _same(model, original)


# ---------------------------------------------------------------- finding 6

def test_t5_with_labels_at_n_equal_t_says_cause_and_way_out(gen):
    """N equal to the decoder length: the whole-model re-run meets T5's scalar .loss."""
    import transformers as T

    _seed(gen)
    m = T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)).eval()
    ids, lab = torch.randint(3, 64, (5, 7), generator=gen), torch.randint(3, 64, (5, 5), generator=gen)
    sg = SampleGram(m)
    with pytest.raises(ValueError, match=r"is a scalar.*labels=.*without labels="):
        with sg.record(torch.arange(5)):
            m(input_ids=ids, labels=lab).loss.backward()
    sg.close()
