"""The row model (gram/rows.py): every failing input of issue 8 whose layout fooled the
engine, as a test whose expected value comes from an fp64 batch-size-1 loop.

Each model takes per-row inputs with the rows in dim 0 (the contract) and returns per-row
outputs; inside, layers see the rows wherever the model puts them (time-major, folded,
broadcast). The loss is a sum over rows of a per-row term, so row r's gradient is the
gradient of that term with row r run alone (``loop_grads``). Tolerances as in
test_sample_gram.py: fp64 1e-10 relative Frobenius.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthograd_fast import reference as ref
from orthograd_fast.gram import SampleGram
from orthograd_fast.gram.rows import DIM0, Layout, candidates, classify, check_rows

TOL64 = 1e-10


def seed_torch(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def sq_loss(out, target):
    """Per-row sum of squares: a row-separable loss for any output shape (rows in dim 0)."""
    return ((out - target) ** 2).sum()


def loop_grads(model, inputs: list[torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: (N, *shape)}: row r's gradient of sq_loss with row r of every input alone."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    N = inputs[0].shape[0]
    out = {n: torch.zeros((N, *p.shape), dtype=p.dtype) for n, p in named}
    for r in range(N):
        loss = sq_loss(model(*[x[r : r + 1] for x in inputs]), target[r : r + 1])
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                out[n][r] = g
    return out


def check_exact(model, inputs, target, seg, S, gen, tol=TOL64, **kw):
    """SampleGram's per-tensor Grams and combine against the loop; returns the engine."""
    gs = ref.segment_grads(loop_grads(model, inputs, target), seg, S)
    sg = SampleGram(model, **kw)
    with sg.record(seg, num_segments=S):
        sq_loss(model(*inputs), target).backward()
    want = ref.gram_from_grads(gs, per_tensor=True)
    got = sg.gram(per_tensor=True)
    # a tensor whose gradient is zero in exact arithmetic (an attention key bias: softmax
    # ignores a shift shared by all keys) is measured against the whole Gram's scale
    floor = 1e-6 * float(sum(K.norm() for K in want.values()))
    for name, K in want.items():
        err = float((got[name] - K).norm()) / max(float(K.norm()), floor)
        assert err < tol, (name, err, sg.coverage()[name])
    w = torch.randn(S, generator=gen, dtype=torch.float64)
    sg.combine(w)
    gfloor = 1e-6 * float(sum(torch.tensordot(w.to(g.dtype), g, dims=1).norm() for g in gs.values()))
    for name, p in model.named_parameters():
        if name in gs:
            exp = torch.tensordot(w.to(gs[name].dtype), gs[name], dims=1)
            err = float((p.grad - exp).norm()) / max(float(exp.norm()), gfloor)
            assert err < tol, ("combine", name, err)
    return sg


def segments_for(N, gen, one_per_row: bool):
    if one_per_row:
        return torch.arange(N), N
    seg = torch.randint(0, 3, (N,), generator=gen)
    seg[0] = -1
    return seg, 3


# ---------------------------------------------------------------------------------------
# the layout primitives
# ---------------------------------------------------------------------------------------
def test_layout_rows_and_unrow_roundtrip(gen):
    N, k = 3, 2
    t = torch.randn(4, N * k, 5, generator=gen)
    for L in candidates(t.shape, N):
        R = L.rows(t, N)
        assert R.shape[0] == N
        for n in range(N):
            idx = (torch.arange(t.shape[L.dim]) % N == n) if L.inner else (torch.arange(t.shape[L.dim]) // L.k == n)
            assert torch.equal(R[n].reshape(-1).sort().values, t.index_select(L.dim, idx.nonzero().flatten()).reshape(-1).sort().values)


def test_classify_tells_time_major_from_batch_first():
    N = 6
    m = torch.zeros(N, N, 4, dtype=torch.bool)
    m[:, 2] = True  # every position of row 2 in a (T, N, d) tensor, T == N
    v = classify(m, N, 2)
    assert v.kind == "layout" and v.layouts == [Layout(1)]
    m = torch.zeros(N, N, 4, dtype=torch.bool)
    m[2] = True
    assert classify(m, N, 2).layouts == [DIM0]
    m[3, 0] = True  # a change outside row 2 in every layout
    assert classify(m, N, 2).kind == "spread"


def test_check_rows_leaves_rng_buffers_and_grads_alone(gen):
    seed_torch(gen)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.3), nn.Linear(5, 2))
    model[1].eval()
    model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(7, 4, generator=gen)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = torch.get_rng_state()
    rm = check_rows(model, {model[0]: "0", model[3]: "3"}, (x,), {}, 7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    assert all(cr.outs[0].layout == DIM0 for cr in rm.calls.values())


# ---------------------------------------------------------------------------------------
# 1. time-major layers
# ---------------------------------------------------------------------------------------
class TimeMajorMLP(nn.Module):
    """Rows in dim 0 outside; the layers see (T, N, ·) with T == N."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.transpose(0, 1)))).transpose(0, 1)


class TimeMajorEncoder(nn.Module):
    """nn.TransformerEncoderLayer with its default batch_first=False, fed (T, N, E)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)

    def forward(self, x):
        return self.enc(x.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("one_per_row", [True, False])
@pytest.mark.parametrize("T", [6, 4])
def test_time_major_mlp(T, one_per_row, gen):
    seed_torch(gen)
    model = TimeMajorMLP().double()
    x = torch.randn(6, T, 5, generator=gen, dtype=torch.float64)
    target = torch.randn(6, T, 3, generator=gen, dtype=torch.float64)
    seg, S = segments_for(6, gen, one_per_row)
    check_exact(model, [x], target, seg, S, gen)


@pytest.mark.parametrize("T", [6, 5])
def test_time_major_transformer_layer(T, gen):
    seed_torch(gen)
    model = TimeMajorEncoder().double()
    x = torch.randn(6, T, 8, generator=gen, dtype=torch.float64)
    target = torch.randn(6, T, 8, generator=gen, dtype=torch.float64)
    sg = check_exact(model, [x], target, torch.arange(6), 6, gen)
    cov = sg.coverage()
    assert cov["enc.self_attn.in_proj_weight"].startswith("attention:"), cov
    assert not any(c.startswith("fallback") for c in cov.values()), cov


def test_orthograd_time_major_step_is_orthogonal(gen):
    """B + F == T: the update's largest |cosine| with an fp64 per-sample retain gradient."""
    from orthograd_fast import OrthoGrad

    seed_torch(gen)
    B, Fn, T = 4, 2, 6
    model = TimeMajorMLP().double()
    x = torch.randn(B + Fn, T, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(B + Fn, T, 3, generator=gen, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_row = loop_grads(model, [x[:B]], y[:B])
    og = OrthoGrad(model, torch.optim.SGD(model.parameters(), lr=0.1),
                   loss_fn=lambda out, t: ((out - t) ** 2).sum((1, 2)))
    og.step((x[B:], y[B:]), (x[:B], y[:B]))
    delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()])
    G = torch.cat([per_row[n].reshape(B, -1) for n, _ in model.named_parameters()], 1)
    cos = (G @ delta) / (G.norm(dim=1) * delta.norm())
    assert float(cos.abs().max()) < 1e-8, cos


# ---------------------------------------------------------------------------------------
# 2. inputs shared by all rows: broadcast position ids, constant buffers
# ---------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    """Token + position embeddings, position ids (1, T) broadcast over the batch (as
    Hugging Face models make them), a constant buffer added, a LayerNorm and a head."""

    def __init__(self, V=17, E=8, T=6):
        super().__init__()
        self.tok = nn.Embedding(V, E)
        self.pos = nn.Embedding(T, E)
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, V)
        self.register_buffer("offset", torch.randn(1, T, E))
        self.offset_proj = nn.Linear(E, E)  # a layer whose input is the shared buffer

    def forward(self, ids):
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)[None]
        h = self.tok(ids) + self.pos(pos) + self.offset_proj(self.offset[:, :T])
        return self.head(self.norm(h))


@pytest.mark.parametrize("one_per_row", [True, False])
def test_broadcast_position_ids_and_buffers(one_per_row, gen):
    seed_torch(gen)
    model = TinyLM().double()
    ids = torch.randint(0, 17, (6, 6), generator=gen)
    target = torch.randn(6, 6, 17, generator=gen, dtype=torch.float64)
    seg, S = segments_for(6, gen, one_per_row)
    sg = check_exact(model, [ids], target, seg, S, gen)
    cov = sg.coverage()
    assert cov["pos.weight"].startswith("fallback:traced"), cov
    assert cov["offset_proj.weight"].startswith("fallback:traced"), cov
    assert cov["tok.weight"].startswith("embedding"), cov


# ---------------------------------------------------------------------------------------
# 5. layers that crashed deep inside torch
# ---------------------------------------------------------------------------------------
class LSTMWithState(nn.Module):
    """nn.LSTM (batch_first) given (h0, c0) computed per row: their batch is dim 1."""

    def __init__(self):
        super().__init__()
        self.init = nn.Linear(3, 2 * 2 * 4)
        self.lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        N = x.shape[0]
        hc = self.init(x[:, 0]).view(N, 2, 2, 4).permute(1, 2, 0, 3)  # [2 (h, c), layers, N, H]
        out, _ = self.lstm(x, (hc[0].contiguous(), hc[1].contiguous()))
        return self.head(out)


def test_lstm_with_initial_state(gen):
    seed_torch(gen)
    model = LSTMWithState().double()
    x = torch.randn(5, 5, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(5, 5, 2, generator=gen, dtype=torch.float64)
    check_exact(model, [x], target, torch.tensor([0, 1, 1, 2, -1]), 3, gen)


class BagOf2D(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 4, mode=mode)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(self.bag(idx))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_2d(mode, gen):
    seed_torch(gen)
    model = BagOf2D(mode).double()
    idx = torch.randint(0, 11, (6, 6), generator=gen)
    target = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    check_exact(model, [idx], target, torch.arange(6), 6, gen)


class BagOffsets(nn.Module):
    """1-D indices and offsets built inside the model from padded rows (as a data pipeline
    flattens them), padding_idx entries, per-sample weights for "sum"."""

    def __init__(self, mode):
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 4, mode=mode, padding_idx=0)
        self.weigh = nn.Linear(1, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        flat = idx.reshape(-1)
        offsets = torch.arange(0, flat.numel(), idx.shape[1], device=idx.device)
        psw = self.weigh(idx.reshape(-1, 1).to(self.head.weight.dtype)).reshape(-1) if self.bag.mode == "sum" else None
        return self.head(self.bag(flat, offsets, per_sample_weights=psw))


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_offsets(mode, gen):
    seed_torch(gen)
    model = BagOffsets(mode).double()
    idx = torch.randint(0, 11, (6, 4), generator=gen)
    target = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    sg = check_exact(model, [idx], target, torch.tensor([0, 1, 2, 2, -1, 0]), 3, gen)
    assert sg.coverage()["bag.weight"] == "embedding:explicit"


def test_offsets_as_a_model_input_are_refused(gen):
    """Offsets passed to the model are not per-row data (a row's offset depends on the
    rows before it): the row check cannot perturb one row, and says so."""
    bag = nn.EmbeddingBag(11, 4)
    flat = torch.randint(0, 11, (24,), generator=gen)
    offsets = torch.arange(0, 24, 4)
    sg = SampleGram(bag)
    with pytest.raises(ValueError, match="offsets|not per-row|interact"):
        with sg.record(torch.arange(6)):
            bag(flat, offsets).square().sum().backward()


class AttnVariants(nn.Module):
    def __init__(self, variant, batch_first):
        super().__init__()
        kw = {"add_bias_kv": {"add_bias_kv": True}, "add_zero_attn": {"add_zero_attn": True},
              "kdim": {"kdim": 5, "vdim": 3}}.get(variant, {})
        self.variant = variant
        self.bf = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
        self.kproj = nn.Linear(8, 5)
        self.vproj = nn.Linear(8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        L = x.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)  # shared by all rows
        h = x if self.bf else x.transpose(0, 1)
        k, v = (self.kproj(h), self.vproj(h)) if self.variant == "kdim" else (h, h)
        out = self.attn(h, k, v, attn_mask=mask, need_weights=False)[0]
        return self.head(out if self.bf else out.transpose(0, 1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("variant", ["plain", "add_bias_kv", "add_zero_attn", "kdim"])
def test_attention_variants_with_shared_causal_mask(variant, batch_first, gen):
    seed_torch(gen)
    model = AttnVariants(variant, batch_first).double()
    x = torch.randn(5, 5, 8, generator=gen, dtype=torch.float64)  # L == N
    target = torch.randn(5, 5, 2, generator=gen, dtype=torch.float64)
    check_exact(model, [x], target, torch.tensor([0, 1, 2, 1, 0]), 3, gen)


class Parametrized(nn.Module):
    def __init__(self, kind):
        super().__init__()
        from torch.nn.utils import parametrizations as P

        wrap = P.weight_norm if kind == "weight_norm" else P.spectral_norm
        self.conv = wrap(nn.Conv1d(3, 4, 3, padding=1))
        self.lin = wrap(nn.Linear(4, 2))

    def forward(self, x):
        return self.lin(torch.tanh(self.conv(x)).transpose(1, 2))


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_parametrized_weights(kind, gen):
    seed_torch(gen)
    model = Parametrized(kind).double().eval()  # spectral_norm's power iteration: eval keeps u, v
    x = torch.randn(6, 3, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 6, 2, generator=gen, dtype=torch.float64)
    check_exact(model, [x], target, torch.tensor([0, 1, 2, 3, 1, -1]), 4, gen)


# ---------------------------------------------------------------------------------------
# 6, 7. rows coupled functionally; non-finite inputs
# ---------------------------------------------------------------------------------------
class Coupled(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.l1, self.l2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = self.l1(x)
        if self.how == "batch_norm":
            h = F.batch_norm(h, None, None, training=True)
        else:
            h = (h - h.mean(0)) / h.std(0)
        return self.l2(h)


@pytest.mark.parametrize("how", ["batch_norm", "standardise"])
def test_rows_coupled_functionally_are_refused(how, gen):
    model = Coupled(how)
    x = torch.randn(6, 5, generator=gen)
    sg = SampleGram(model)
    with pytest.raises(ValueError, match="interact"):
        with sg.record(torch.arange(6)):
            model(x).square().sum().backward()


def test_nonfinite_input_is_refused(gen):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(5, 4, generator=gen)
    x[2, 1] = float("inf")
    sg = SampleGram(model)
    with pytest.raises(ValueError, match="(?i)inf"):
        with sg.record(torch.arange(5)):
            model(x).square().sum().backward()
        sg.gram()


# ---------------------------------------------------------------------------------------
# the property test's findings (tests/test_sample_gram_property.py; notes in its header)
# ---------------------------------------------------------------------------------------
class SharedThenPooled(nn.Module):
    """Position embeddings of (1, T) ids, then first- or last-token pooling: with T == N the
    row check's gradient lands on one position, which may be index r0 (finding 5: a silent
    mismatch before two cotangents and row-constancy were required)."""

    def __init__(self, last: bool, T: int):
        super().__init__()
        self.last = last
        self.inp, self.pos, self.head = nn.Linear(3, 4), nn.Embedding(T, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x) + self.pos(torch.arange(x.shape[1])[None]))
        return self.head(h[:, -1] if self.last else h[:, 0])


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("N", [2, 3, 4, 5])
def test_shared_embedding_then_pooling_T_equals_N(N, last, gen):
    seed_torch(gen)
    model = SharedThenPooled(last, N).double()
    x = torch.randn(N, N, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    check_exact(model, [x], target, torch.arange(N), N, gen)


class RepeatedIdsPooled(nn.Module):
    """Per-row position ids (repeated), last-token pooling, T == N (finding 6)."""

    def __init__(self, T):
        super().__init__()
        self.inp, self.pos, self.head = nn.Linear(3, 4), nn.Embedding(T, 4), nn.Linear(4, 2)

    def forward(self, x, position_ids):
        return self.head(torch.tanh(self.inp(x) + self.pos(position_ids))[:, -1])


def test_repeated_position_ids_with_pooling(gen):
    seed_torch(gen)
    N = T = 3
    model = RepeatedIdsPooled(T).double()
    x = torch.randn(N, T, 3, generator=gen, dtype=torch.float64)
    ids = torch.arange(T).repeat(N, 1)
    target = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    check_exact(model, [x, ids], target, torch.arange(N), N, gen)


class CrossAttnPadded(nn.Module):
    """Cross-attention (the per-row fallback) with a per-row key padding mask that is equal
    in most rows (finding 1: taken as shared, crashed inside torch)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(3, 4), nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, y, x, pad):
        kv = self.enc(x)
        return self.attn(self.dec(y), kv, kv, key_padding_mask=pad, need_weights=False)[0]


@pytest.mark.parametrize("padded_row", [0, 2, 4])
def test_cross_attention_with_mostly_equal_padding_mask(padded_row, gen):
    seed_torch(gen)
    model = CrossAttnPadded().double()
    y = torch.randn(5, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
    pad = torch.zeros(5, 4, dtype=torch.bool)
    pad[padded_row, 2:] = True
    target = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    check_exact(model, [y, x, pad], target, torch.arange(5), 5, gen)


class ZeroMaskCross(nn.Module):
    """A shared (L, L) additive mask whose rows are all equal, L == N (finding 3)."""

    def __init__(self):
        super().__init__()
        self.kproj = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        L = x.shape[1]
        kv = self.kproj(x)
        return self.attn(x, kv, kv, attn_mask=torch.zeros(L, L, dtype=x.dtype), need_weights=False)[0]


def test_row_equal_shared_mask_L_equals_N(gen):
    seed_torch(gen)
    model = ZeroMaskCross().double()
    x = torch.randn(4, 4, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(4, 4, 4, generator=gen, dtype=torch.float64)
    check_exact(model, [x], target, torch.arange(4), 4, gen)


def test_parametrized_weight_with_one_row(gen):
    """N = 1 (finding 2): a parametrization's weight computed from no per-row input."""
    from torch.nn.utils.parametrizations import weight_norm

    seed_torch(gen)
    model = nn.Sequential(weight_norm(nn.Linear(3, 2))).double()
    x = torch.randn(1, 5, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(1, 5, 2, generator=gen, dtype=torch.float64)
    check_exact(model, [x], target, torch.arange(1), 1, gen)


def test_zero_gradient_parameter_is_not_refused(gen):
    """weight_norm with fan-in 1: the direction's gradient is zero in exact arithmetic
    (finding 4: both sides of the probe were rounding noise, read as outside gradient)."""
    from torch.nn.utils.parametrizations import weight_norm

    seed_torch(gen)
    model = nn.Sequential(nn.Linear(3, 1), nn.Tanh(), weight_norm(nn.Linear(1, 4))).double()
    x = torch.randn(6, 5, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64)
    check_exact(model, [x], target, torch.arange(6), 6, gen)


class CoupledAlongBatch(nn.Module):
    """Rows coupled along the batch, causally or not, with every module upstream frozen:
    an LSTM run over the batch dim (batch_first=False fed (N, T, F)), a cumsum over rows
    and its reverse (finding 7: served with a wrong Gram when the check's row was the last)."""

    def __init__(self, coupling):
        super().__init__()
        self.coupling = coupling
        self.lstm = nn.LSTM(2, 3).requires_grad_(False)
        self.pre = nn.Linear(2, 3).requires_grad_(False)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        if self.coupling == "lstm":
            h = self.lstm(x)[0]
        elif self.coupling == "cumsum":
            h = torch.tanh(self.pre(x)).cumsum(0)
        else:
            h = torch.tanh(self.pre(x)).flip(0).cumsum(0).flip(0)
        return self.head(h)


@pytest.mark.parametrize("N", [3, 4, 5])
@pytest.mark.parametrize("coupling", ["lstm", "cumsum", "reverse_cumsum"])
def test_rows_coupled_along_the_batch_are_refused(coupling, N, gen):
    seed_torch(gen)
    model = CoupledAlongBatch(coupling).double()
    x = torch.randn(N, 4, 2, generator=gen, dtype=torch.float64)
    sg = SampleGram(model)
    with pytest.raises(ValueError, match="interact"):
        with sg.record(torch.arange(N)):
            model(x).square().sum().backward()
