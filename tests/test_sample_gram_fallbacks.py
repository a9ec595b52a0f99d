"""SampleGram's exact fallbacks: the op tracer, module re-runs, attention variants, and the
segment-sum helper, against the fp64 batch-size-1 reference (same conventions as
test_sample_gram.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthograd_fast.gram import SampleGram
from orthograd_fast.gram.rules.base import segment_sum
from test_sample_gram import assert_combine, assert_grams, ce_sum, random_segments, reference_segments, seed_torch


def run(model, x, y, seg, S, **kw):
    sg = SampleGram(model, **kw)
    with sg.record(seg, num_segments=S):
        ce_sum(model(x), y).backward()
    return sg


class Patterns(nn.Module):
    """Bare parameters used the ways real models use them."""

    def __init__(self, E=6, T=5, V=13):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.cls = nn.Parameter(torch.randn(1, 1, E))
        self.pos = nn.Parameter(torch.randn(1, 2 * T, E))  # sliced to the sequence length
        self.log_scale = nn.Parameter(0.1 * torch.randn(E))  # derived through exp()
        self.shift = nn.Parameter(torch.randn(E))
        self.mix = nn.Linear(E, E)

    def forward(self, tok):
        h = self.emb(tok)
        T = h.shape[1]
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h + self.pos[:, :T]], dim=1)
        h = torch.tanh(self.mix(h * self.log_scale.exp() + self.shift))
        return F.linear(h.mean(1), self.emb.weight)  # tied output head, functionally


def test_tracer_patterns(gen):
    seed_torch(gen)
    model = Patterns().double()
    x = torch.randint(0, 13, (11, 5), generator=gen)
    y = torch.randint(0, 13, (11,), generator=gen)
    seg, S = random_segments(11, gen)
    gs = reference_segments(model, x, y, seg, S)
    sg = SampleGram(model)
    with pytest.warns(RuntimeWarning, match="emb.weight"):
        with sg.record(seg, num_segments=S):
            ce_sum(model(x), y).backward()
    assert_grams(sg, gs, 1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sg.record(seg, num_segments=S):
            ce_sum(model(x), y).backward()
    cov = sg.coverage()
    print(cov)
    for name in ("cls", "pos", "log_scale", "shift", "emb.weight"):
        assert cov[name].startswith("fallback:traced"), (name, cov[name])
    assert_grams(sg, gs, 1e-10)
    assert_combine(sg, model, gs, S, gen, 1e-10)


def test_tracer_gives_up_then_reruns(gen):
    """A parameter turned into the batch by an op that is not a broadcast (repeat)."""
    seed_torch(gen)

    class Rep(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.bias_rows = nn.Parameter(torch.randn(1, 3))

        def forward(self, x):
            return self.lin(x) + self.bias_rows.repeat(x.shape[0], 1)

    model = Rep().double()
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    seg = torch.tensor([0, 1, 1, 2, -1, 0, 2])
    sg = run(model, x, y, seg, 3)
    assert sg.coverage()["bias_rows"].startswith("fallback:rerun")
    gs = reference_segments(model, x, y, seg, 3)
    assert_grams(sg, gs, 1e-10)
    assert_combine(sg, model, gs, 3, gen, 1e-10)


class Encoder(nn.Module):
    def __init__(self, d=8, heads=2, T=6, causal=False):
        super().__init__()
        self.causal = causal
        self.embed = nn.Linear(3, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, 12, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        pad = x[..., 0] > 1.2  # key padding mask from the data, per row
        pad[:, 0] = False
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1) if self.causal else None
        h = self.layer(self.embed(x), src_mask=mask, src_key_padding_mask=pad, is_causal=self.causal)
        return self.head(h.mean(1))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_masks(causal, gen):
    seed_torch(gen)
    model = Encoder(causal=causal).double()
    x = torch.randn(9, 6, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (9,), generator=gen)
    seg = torch.tensor([0, 0, 1, 2, 3, -1, 3, 1, 2])
    sg = run(model, x, y, seg, 4)
    gs = reference_segments(model, x, y, seg, 4)
    assert_grams(sg, gs, 1e-10)
    assert_combine(sg, model, gs, 4, gen, 1e-10)


def test_cross_attention(gen):
    seed_torch(gen)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(3, 8)
            self.kv = nn.Linear(5, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=8, vdim=8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            q, kv = self.q(x[..., :3]), self.kv(x[..., 3:])
            return self.head(self.attn(q, kv, kv)[0].mean(1))

    model = Cross().double()
    x = torch.randn(8, 4, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen)
    seg = torch.tensor([0, 1, 1, 2, 0, 2, -1, 1])
    sg = run(model, x, y, seg, 3)
    assert sg.coverage()["attn.in_proj_weight"].startswith("fallback:module(attn)")
    gs = reference_segments(model, x, y, seg, 3)
    assert_grams(sg, gs, 1e-10)


class SelfAttn(nn.Module):
    def __init__(self, dropout=0.0, cross=False):
        super().__init__()
        self.cross = cross
        self.attn = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        kv = x.flip(1) if self.cross else x
        return self.head(self.attn(x, kv, kv)[0].mean(1))  # need_weights=True (default)


def test_attention_read_from_graph(gen):
    """Self-attention called directly (need_weights=True): projections read from the graph."""
    seed_torch(gen)
    model = SelfAttn().double()
    x = torch.randn(7, 4, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    seg = torch.tensor([0, 1, 2, 2, -1, 1, 0])
    sg = run(model, x, y, seg, 3)
    cov = sg.coverage()
    assert cov["attn.in_proj_weight"].startswith("attention:") and cov["attn.out_proj.bias"].startswith("attention:")
    gs = reference_segments(model, x, y, seg, 3)
    assert_grams(sg, gs, 1e-10)
    assert_combine(sg, model, gs, 3, gen, 1e-10)


def test_attention_dropout(gen):
    """Dropout inside self-attention is fine (the real pass is read): Σ_s g_s is autograd's
    gradient. Cross-attention goes to the per-row re-run, which cannot replay dropout."""
    seed_torch(gen)
    model = SelfAttn(dropout=0.5)
    x = torch.randn(6, 3, 8, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    sg = SampleGram(model)
    with sg.record(torch.arange(6)):
        ce_sum(model(x), y).backward()
    total = {n: p.grad.clone() for n, p in model.named_parameters()}
    sg.combine(torch.ones(6))
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, total[n], rtol=1e-4, atol=1e-6), n
    cross = SelfAttn(dropout=0.5, cross=True)
    sg = SampleGram(cross)
    with pytest.raises(ValueError, match="dropout"):
        with sg.record(torch.arange(6)):
            ce_sum(cross(x), y).backward()


class Recurrent(nn.Module):
    """Embedding -> nn.LSTM or nn.GRU (2 layers, batch_first) -> head on the last step.
    torch.func cannot vmap them (they write into unbatched hidden state)."""

    def __init__(self, cell: str, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](4, 5, num_layers=2, batch_first=True, dropout=dropout)
        self.head = nn.Linear(5, 3)

    def forward(self, tok):
        h = self.rnn(self.emb(tok))[0]
        return self.head(h[:, -1])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_unvmappable_module_loops_over_rows(cell, gen):
    seed_torch(gen)
    model = Recurrent(cell).double()
    x = torch.randint(0, 11, (9, 4), generator=gen)
    y = torch.randint(0, 3, (9,), generator=gen)
    seg, S = random_segments(9, gen)
    gs = reference_segments(model, x, y, seg, S)
    with pytest.warns(UserWarning, match="loop of 9 backward passes"):
        sg = run(model, x, y, seg, S)
    assert sg.coverage()["rnn.weight_hh_l0"].startswith("fallback")
    assert_grams(sg, gs, 1e-10)
    assert_combine(sg, model, gs, S, gen, 1e-10)


def test_unvmappable_module_with_dropout_is_refused(gen):
    """The row loop cannot replay the recorded dropout masks: refused, like the vmap path."""
    seed_torch(gen)
    model = Recurrent("lstm", dropout=0.5).double()
    x = torch.randint(0, 11, (6, 4), generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    sg = SampleGram(model)
    with pytest.raises(ValueError, match="dropout"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sg.record(torch.arange(6)):
            ce_sum(model(x), y).backward()
    model.eval()  # no dropout: served exactly
    gs = reference_segments(model, x, y, torch.arange(6), 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sg.record(torch.arange(6)):
            ce_sum(model(x), y).backward()
    assert_grams(sg, gs, 1e-10)


def test_attention_batch_not_first_is_refused(gen):
    model = nn.MultiheadAttention(8, 2)  # (T, N, E): the batch is dim 1
    x = torch.randn(5, 4, 8, generator=gen)
    sg = SampleGram(model)
    with pytest.raises(ValueError, match="batch"):
        with sg.record(torch.arange(4)):
            model(x, x, x)[0].sum().backward()


def test_embedding_options_refused():
    with pytest.raises(ValueError, match="max_norm"):
        SampleGram(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        SampleGram(nn.Embedding(5, 3, scale_grad_by_freq=True))


def test_low_precision_runs(gen):
    """bf16 data: rules accumulate in fp32/fp64; the Gram matches to bf16 accuracy."""
    seed_torch(gen)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
    x = torch.randn(8, 6, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    seg = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    gs = reference_segments(model, x, y, seg, 4)
    m16 = model.to(torch.bfloat16)
    sg = run(m16, x.to(torch.bfloat16), y, seg, 4)
    K, Kref = sg.gram(), sum(g.reshape(4, -1) @ g.reshape(4, -1).T for g in gs.values())
    assert float((K - Kref).norm() / Kref.norm()) < 5e-2


@pytest.mark.parametrize("n,S", [(1, 1), (7, 3), (20, 20), (50, 4), (9, 12)])
def test_segment_sum(n, S, gen):
    ids = torch.randint(0, S, (n,), generator=gen)
    rows = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    expected = torch.zeros(S, 5, dtype=torch.float64).index_add_(0, ids, rows)
    assert torch.allclose(segment_sum(rows, ids, S), expected, rtol=1e-13, atol=1e-13)
    assert segment_sum(rows[:0], ids[:0], S).abs().sum() == 0


class Reuse(nn.Module):
    """Each rule's parameter used once by its module and once functionally elsewhere."""

    def __init__(self, which):
        super().__init__()
        self.which = which
        self.emb = nn.Embedding(9, 4)
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(1, 1, 3, padding=1)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, tok):
        h = self.emb(tok)  # [N, T, E=4]
        if self.which == "embedding":
            h = h + F.embedding(tok.flip(1), self.emb.weight)
        c = self.c1(h.transpose(1, 2))  # [N, 4, T]
        if self.which == "conv1d":
            c = c + F.conv1d(h.transpose(1, 2), self.c1.weight, padding=1)
        if self.which == "conv_bias":  # a bias the rule reads detached, used again outside
            c = c * self.c1.bias[:, None].tanh()
        img = self.c2(c.unsqueeze(1))  # [N, 1, 4, T]
        if self.which == "conv2d":
            img = img * F.conv2d(c.unsqueeze(1), self.c2.weight, padding=1).tanh()
        c = self.gn(img.reshape(c.shape) + c)
        if self.which == "group_norm":
            c = c * self.gn.weight[:, None]
        z = self.ln(c.mean(-1))
        if self.which == "layer_norm":
            z = z + self.ln.bias
        out = self.lin(torch.tanh(z))
        if self.which == "linear":
            out = out + F.linear(z, self.lin.weight)
        return out


@pytest.mark.parametrize(
    "kept,record_grads", [(False, True), (True, True), (False, False)], ids=["ignored_row", "all_kept", "no_grads"]
)
@pytest.mark.parametrize("which", ["embedding", "conv1d", "conv_bias", "conv2d", "group_norm", "layer_norm", "linear"])
def test_each_rule_detects_outside_use(which, kept, record_grads, gen):
    """With every row kept (or record_grads=False), the Linear/Conv weights are read detached
    in their module (store mode): the outside use is then the only gradient autograd
    delivers, which is caught too; .grad still ends up autograd's full gradient (with
    record_grads; else only for the parameters that were not detached)."""
    seed_torch(gen)
    model = Reuse(which).double()
    x = torch.randint(0, 9, (8, 5), generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    seg = torch.tensor([0, 1, 1, 2, 3 if kept else -1, 0, 2, 3])
    gs = reference_segments(model, x, y, seg, 4)
    total = reference_segments(model, x, y, torch.zeros(8, dtype=torch.long), 1)
    sg = SampleGram(model, record_grads=record_grads)
    with pytest.warns(RuntimeWarning, match="did not see"):
        with sg.record(seg, num_segments=4):
            ce_sum(model(x), y).backward()
    detached = {g for rule in sg._rule_list() for g in rule.skipped}
    assert bool(detached) == (kept or not record_grads), detached
    for n, p in model.named_parameters():  # without record_grads, weights' .grad is combine's
        if record_grads or not isinstance(getattr(model, n.split(".")[0]), (nn.Linear, nn.Conv1d, nn.Conv2d)):
            assert torch.allclose(p.grad, total[n][0], rtol=1e-10, atol=1e-12), n
    moved = [n for n, v in sg.coverage().items() if "outside its module" in v]
    assert len(moved) == 1, moved
    assert_grams(sg, gs, 1e-10)
    with sg.record(seg, num_segments=4):  # later steps: traced, still exact
        ce_sum(model(x), y).backward()
    assert_grams(sg, gs, 1e-10)
    assert_combine(sg, model, gs, 4, gen, 1e-10)
