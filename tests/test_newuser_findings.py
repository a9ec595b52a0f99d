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
