"""Per-row re-runs of the fallback leave the model as one plain step leaves it (issue 8, item 4).

The fallback (rules/fallback.py) re-runs a module without a rule after the backward, once
vmapped over rows or once per row. Each test runs the same model twice from the same state
and RNG: ``plain`` (forward + backward) and under ``record()`` (forward + backward + gram),
and compares what they leave: every buffer (bitwise: both runs do the same arithmetic on
the same numbers in the recorded forward, and nothing else may touch the buffers), the
global RNG state, plain attributes, eval-mode outputs (bitwise), ``.grad`` (rounding of
fp32 summation orders aside: 1e-6 of the gradients' norm), and the Grams against the fp64 batch-size-1 loop
(test_sample_gram.py's bounds: fp64 1e-10, fp32 1e-4).

InstanceNorm1d(track_running_stats=True) in train mode normalises each row by its own
statistics, so rows are independent: its Gram must be exact, not refused. torch.func
cannot vmap its running-statistics update, so it takes the per-row loop; a call counter
in a plain attribute takes the vmap path, one in a buffer the loop; nn.LSTM the loop.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from orthograd_fast.gram import SampleGram
from test_sample_gram import assert_grams, ce_sum, random_segments, reference_segments, seed_torch


class NormNet(nn.Module):
    """Conv1d -> InstanceNorm1d(affine, track_running_stats) -> [Dropout] -> Linear."""

    def __init__(self, p_drop: float = 0.0):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.norm = nn.InstanceNorm1d(4, affine=True, track_running_stats=True, momentum=0.3)
        self.drop = nn.Dropout(p_drop)
        self.fc = nn.Linear(4 * 6, 5)

    def forward(self, x):
        return self.fc(self.drop(self.norm(self.conv(x))).flatten(1))


class Counting(nn.Module):
    """No rule serves it: around tanh(x W), it counts its calls (in a buffer, which
    torch.func's grad cannot mutate: the per-row loop; or in a plain attribute: vmapped)
    and keeps the last input shape in a plain attribute."""

    def __init__(self, d: int, buffer: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        if buffer:
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        else:
            self.calls = 0
        self.last_shape = None

    def forward(self, x):
        self.calls += 1
        self.last_shape = tuple(x.shape)
        return torch.tanh(x @ self.w)


class CountNet(nn.Module):
    def __init__(self, buffer: bool):
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.count = Counting(5, buffer)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.count(self.inp(x)))


class LSTMNet(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, num_layers=2, batch_first=True, dropout=dropout)
        self.norm = nn.InstanceNorm1d(5, affine=True, track_running_stats=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.rnn(x)[0]  # [N, T, 5]
        return self.head(self.norm(h.transpose(1, 2))[..., -1])  # (the time mean would be β)


def attributes(model):
    return {(name, k): v for name, m in model.named_modules() for k, v in vars(m).items() if not k.startswith("_")}


def steps(model, x, y, seg, S, gen, warm=False):
    """(plain copy after forward + backward, SampleGram after record) from one state and
    RNG; returns (plain, sg, RNG after plain, RNG after record, loop warnings). ``warm``:
    both run one step first, after which the plain attributes of ``model`` are set to
    ``plain``'s: the step compared is then one whose row check (gram/rows.py, once per
    signature) is cached, so that only the fallback's re-runs can differ."""
    plain = copy.deepcopy(model)
    sg = SampleGram(model)
    for step in range(2 if warm else 1):
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        torch.manual_seed(seed)
        ce_sum(plain(x), y).backward()
        rng_plain = torch.get_rng_state()
        torch.manual_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with sg.record(seg, num_segments=S):
                ce_sum(model(x), y).backward()
            sg.gram()
        if warm and step == 0:
            for m, q in zip(model.modules(), plain.modules()):
                for k, v in vars(q).items():
                    if not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module)):
                        setattr(m, k, v)
    loops = [str(w.message) for w in caught if "loop of" in str(w.message)]
    return plain, sg, rng_plain, torch.get_rng_state(), loops


def assert_same_state(model, plain, rng_plain, rng, x):
    assert torch.equal(rng, rng_plain), "global RNG state moved"
    bufs, pbufs = dict(model.named_buffers()), dict(plain.named_buffers())
    assert list(bufs) == list(pbufs)
    for name in bufs:
        assert torch.equal(bufs[name], pbufs[name]), (name, bufs[name], pbufs[name])
    assert attributes(model).keys() == attributes(plain).keys()
    for key, v in attributes(model).items():
        if not isinstance(v, (torch.Tensor, nn.Module)):
            assert v == attributes(plain)[key], key
    scale = sum(float(q.grad.double().norm()) for q in plain.parameters())
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), name
        assert p.grad is not None and float((p.grad - q.grad).double().norm()) <= 1e-6 * scale, name
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_instance_norm_train_mode_loop(dtype, gen):
    """Issue 8, item 4: after one record() running_mean was 4.1x off a plain backward's."""
    seed_torch(gen)
    model = NormNet().to(dtype).train()
    x = torch.randn(9, 3, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, 5, (9,), generator=gen)
    seg, S = random_segments(9, gen)
    gs = reference_segments(model, x, y, seg, S)
    plain, sg, rng_plain, rng, loops = steps(model, x, y, seg, S, gen)
    assert any("InstanceNorm1d" in w for w in loops), loops  # the per-row loop ran
    assert sg.coverage()["norm.weight"].startswith("fallback")
    assert_grams(sg, gs, 1e-10 if dtype == torch.float64 else 1e-4)
    assert_same_state(model, plain, rng_plain, rng, x)


def test_instance_norm_with_dropout_elsewhere(gen):
    """Dropout between the fallback's module and a Linear: the recorded forward draws its
    mask, the re-runs of the InstanceNorm draw nothing, and the RNG ends where a plain
    step leaves it."""
    seed_torch(gen)
    model = NormNet(p_drop=0.4).train()
    x = torch.randn(7, 3, 8, generator=gen)
    y = torch.randint(0, 5, (7,), generator=gen)
    plain, sg, rng_plain, rng, loops = steps(model, x, y, torch.arange(7), 7, gen)
    assert loops
    assert_same_state(model, plain, rng_plain, rng, x)


@pytest.mark.parametrize("buffer", [False, True], ids=["vmap", "loop"])
def test_counter_and_attribute(buffer, gen):
    """A module that counts its calls and keeps its input's shape: the re-runs must not
    count, nor leave a one-row shape behind."""
    seed_torch(gen)
    model = CountNet(buffer).double()
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    seg, S = random_segments(10, gen)
    gs = reference_segments(model, x, y, seg, S)
    plain, sg, rng_plain, rng, loops = steps(model, x, y, seg, S, gen, warm=not buffer)
    assert bool(loops) == buffer, loops  # which path ran
    assert sg.coverage()["count.w"].startswith("fallback")
    assert_grams(sg, gs, 1e-10)
    assert model.count.last_shape == (10, 5) and int(model.count.calls) == int(plain.count.calls)
    assert_same_state(model, plain, rng_plain, rng, x)


def test_lstm_loop_and_instance_norm(gen):
    seed_torch(gen)
    model = LSTMNet().double().train()
    x = torch.randn(8, 4, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    seg, S = random_segments(8, gen)
    gs = reference_segments(model, x, y, seg, S)
    plain, sg, rng_plain, rng, loops = steps(model, x, y, seg, S, gen)
    assert any("LSTM" in w for w in loops) and any("InstanceNorm1d" in w for w in loops), loops
    assert_grams(sg, gs, 1e-10)
    assert_same_state(model, plain, rng_plain, rng, x)


def test_refused_dropout_restores_rng(gen):
    """The row loop draws on its first row, sees the generator move and refuses; the RNG
    and buffers still end as after a plain step."""
    seed_torch(gen)
    model = LSTMNet(dropout=0.5).double().train()
    x = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    plain = copy.deepcopy(model)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    torch.manual_seed(seed)
    ce_sum(plain(x), y).backward()
    rng_plain = torch.get_rng_state()
    torch.manual_seed(seed)
    sg = SampleGram(model)
    with pytest.raises(ValueError, match="dropout"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sg.record(torch.arange(6)):
            ce_sum(model(x), y).backward()
    assert torch.equal(torch.get_rng_state(), rng_plain)
    for (name, b), (_, c) in zip(model.named_buffers(), plain.named_buffers()):
        assert torch.equal(b, c), name


class Clamped(nn.Module):
    """Clips its own weight in place during forward (a projection some models do there)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        with torch.no_grad():
            self.w.clamp_(-0.5, 0.5)
        return torch.tanh(x @ self.w)


def test_parameter_written_in_forward_is_refused(gen):
    seed_torch(gen)
    model = nn.Sequential(nn.Linear(4, 5), Clamped(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=gen)
    sg = SampleGram(model)
    with pytest.raises(ValueError, match="writes into its parameters"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sg.record(torch.arange(6)):
            ce_sum(model(x), y).backward()


def test_row_check_leaves_attributes(gen):
    """The row check's extra forwards (gram/rows.py) leave plain attributes as one plain
    forward does (a call counter)."""
    seed_torch(gen)
    model = CountNet(buffer=False).double()
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    plain, *_ = steps(model, x, y, torch.arange(10), 10, gen)
    assert model.count.calls == plain.count.calls
