"""SampleGram with backend="triton" (rules/matrix_triton.py) on the engine's zoo.

Every Linear/Conv weight Gram that the kernels serve is checked against the fp64
batch-size-1 loop (test_sample_gram.reference_segments) and against the torch backend on
the same fp32 model and rows, with test_sample_gram's fp32 tolerance (1e-4 normwise: fp32
data against the fp64 reference; the kernels' own bounds are far inside it,
tests/test_gram_kernels.py). Coverage labels say which weights the kernels formed
("...[triton]"), and the tests require them where the backend must use them, so a silent
fall back to the torch path fails. Stream mode never keeps segment gradients, so there
every explicit layer runs the flash-Gram; store mode keeps them where they are small
(the torch path's tiles, matrix_triton.py says why) and runs the ghost kernel.

On the CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1; fp32 only:
the interpreter computes bf16 tl.dot wrongly), small shapes; with TRITON_INTERPRET=0 on a
CUDA machine, compiled on the GPU (bench/gpu_check.sh), the reference still on the CPU.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from test_ghost_cancellation import EPS, IDS, S as CS, assert_no_worse, cancelling_rows, true_grams
from test_sample_gram import ZOO, ce_sum, random_segments, reference_segments, rel, seed_torch
from torch import nn

from orthograd_fast import reference as ref
from orthograd_fast.gram import SampleGram
from orthograd_fast.gram.rules import matrix, matrix_triton
from orthograd_fast.gram.rules.base import GramOptions, Segments, gram_from_row_grads
from orthograd_fast.gram.rules.linear import LinearRows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu")
pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cpu" and not INTERPRET, reason="Triton needs a GPU or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]
TOL = 1e-4  # fp32 (test_sample_gram.TOL)


def case(name: str, gen, N: int = 9, seg=None):
    """(fp32 model on the CPU, x, y, segments, S, fp64 reference segment gradients)."""
    seed_torch(gen)
    model, make = ZOO[name]()
    x, y = make(N, gen)
    seg, S = random_segments(N, gen) if seg is None else seg
    return model, x, y, seg, S, reference_segments(model, x, y, seg, S)


def record(model, x, y, seg, S, **kw):
    """A copy of model on DEVICE recorded over the rows; (engine, device model)."""
    m = copy.deepcopy(model).to(DEVICE)
    sg = SampleGram(m, **kw)
    with sg.record(seg.to(DEVICE), num_segments=S):
        ce_sum(m(x.to(DEVICE)), y.to(DEVICE)).backward()
    return sg, m


def check_grams(sg, gs, other=None):
    """Global and per-tensor Grams against the fp64 loop's (and against ``other``'s)."""
    K, Kt = sg.gram().cpu(), {n: v.cpu() for n, v in sg.gram(per_tensor=True).items()}
    assert K.dtype == torch.float64 and torch.isfinite(K).all()
    Kref, Kref_t = ref.gram_from_grads(gs), ref.gram_from_grads(gs, per_tensor=True)
    assert rel(K, Kref) < TOL, rel(K, Kref)
    scale = float(Kref.norm())
    for n in Kref_t:
        floor = max(float(Kref_t[n].norm()), 1e-3 * scale)
        assert float((Kt[n] - Kref_t[n]).norm()) <= TOL * floor, (n, sg.coverage()[n])
        if other is not None:
            Ko = other.gram(per_tensor=True)[n].cpu()
            assert float((Kt[n] - Ko).norm()) <= TOL * floor, ("vs torch backend", n)


def check_grads(model, gs, w):
    """.grad of every served parameter == Σ_s w[name][s] g_s (w: {name: (S,) fp64})."""
    params = dict(model.named_parameters())
    for n, g in gs.items():
        exp = torch.einsum("s,s...->...", w[n], g)
        got = params[n].grad
        assert got is not None and rel(got.cpu(), exp) < TOL, (n, rel(got.cpu(), exp))


def triton_labels(sg) -> dict[str, str]:
    """{name: label} of the Linear/Conv weights (labels "linear:ghost", "conv2d:explicit[triton]", ...)."""
    return {n: v for n, v in sg.coverage().items()
            if v.startswith(("linear:", "conv")) and (":ghost" in v or ":explicit" in v)}


# --------------------------------------------------------------------------------------
# the zoo
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_store(name, gen):
    """Store mode: the ghost kernel serves the ghost layers (kept segment gradients stay
    the torch path's); Grams, per-tensor Grams and combine (global and per tensor)."""
    model, x, y, seg, S, gs = case(name, gen)
    sg, m = record(model, x, y, seg, S, backend="triton")
    sg_t, _ = record(model, x, y, seg, S, backend="torch")
    kept = set(sg._step.tiles)
    for n, label in triton_labels(sg).items():
        assert label.endswith("[triton]") == (n not in kept), (n, label)
    check_grams(sg, gs, sg_t)
    w0 = torch.randn(S, generator=gen, dtype=torch.float64)
    sg.combine(w0.to(DEVICE))
    check_grads(m, gs, {n: w0 for n in gs})
    w = {n: torch.randn(S, generator=gen, dtype=torch.float64) for n in gs}
    sg.combine({n: v.to(DEVICE) for n, v in w.items()})
    check_grads(m, gs, w)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_stream(name, gen):
    """Stream mode keeps no segment gradients: every Linear/Conv weight Gram is the
    kernels' (flash-Gram or ghost by the cost model); combine by the reweight pass."""
    model, x, y, seg, S, gs = case(name, gen)
    sg, m = record(model, x, y, seg, S, backend="triton", mode="stream")
    sg_t, _ = record(model, x, y, seg, S, backend="torch", mode="stream")
    labels = triton_labels(sg)
    assert all(v.endswith("[triton]") for v in labels.values()), labels
    if name in ("cnn", "conv1d", "transformer"):  # sequences and convolutions: the flash-Gram
        assert any(v.endswith(":explicit[triton]") for v in labels.values()), labels
    check_grams(sg, gs, sg_t)
    w = torch.randn(S, generator=gen, dtype=torch.float64)
    with sg.reweight(w.to(DEVICE)):
        ce_sum(m(x.to(DEVICE)), y.to(DEVICE)).backward()
    check_grads(m, gs, {n: w for n in gs})


@pytest.mark.parametrize("name", ["cnn", "conv1d", "transformer"])
def test_forced_ghost(name, gen):
    """The ghost kernel on the layers the cost model sends to the flash-Gram (grouped
    convolutions, sequences; their flash-Gram runs in test_zoo_stream): method forced,
    stream mode."""
    model, x, y, seg, S, gs = case(name, gen, N=6)
    sg, _ = record(model, x, y, seg, S, backend="triton", mode="stream", method="ghost")
    labels = triton_labels(sg)
    assert labels and all(v.endswith(":ghost[triton]") for v in labels.values()), labels
    check_grams(sg, gs)


def test_repeated_module_sequence_rows(gen):
    """One Linear called twice on (N, T, d) rows: the calls' cross terms, both kernels."""
    seed_torch(gen)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))).mean(1))

    model = Twice()
    x = torch.randn(9, 4, 5, generator=gen)
    y = torch.randint(0, 3, (9,), generator=gen)
    seg = torch.tensor([0, 1, 1, 2, 0, -1, 2, 2, 0])
    gs = reference_segments(model, x, y, seg, 3)
    for method in ("ghost", "explicit"):
        sg, _ = record(model, x, y, seg, 3, backend="triton", mode="stream", method=method)
        assert sg.coverage()["lin.weight"] == f"linear:{method}[triton]"
        check_grams(sg, gs)


# --------------------------------------------------------------------------------------
# segments
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which, method", [("S1", "ghost"), ("S1", "explicit"), ("one_row_each", "explicit"),
                                           ("empty_tail", "ghost"), ("empty_tail", "explicit"),
                                           ("all_ignored_but_one", "explicit")])
def test_segment_edge_cases(which, method, gen):
    N = 6
    seg, S = {
        "S1": (torch.zeros(N, dtype=torch.long), 1),
        "one_row_each": (torch.randperm(N, generator=gen), N),
        "empty_tail": (torch.tensor([0, 1, 1, 0, -1, 2]), 6),
        "all_ignored_but_one": (torch.tensor([-1, -1, 0, -1, -1, -1]), 2),
    }[which]
    model, x, y, seg, S, gs = case("mlp", gen, N=N, seg=(seg, S))
    sg, m = record(model, x, y, seg, S, backend="triton", mode="stream", method=method)
    assert all(v.endswith("[triton]") for v in triton_labels(sg).values())
    check_grams(sg, gs)
    K = sg.gram().cpu()
    empty = torch.bincount(seg[seg >= 0], minlength=S) == 0
    assert (K[empty] == 0).all() and (K[:, empty] == 0).all()


def test_all_rows_ignored(gen):
    model, x, y, _, _, _ = case("mlp", gen, N=5, seg=(torch.zeros(5, dtype=torch.long), 1))
    for mode in ("store", "stream"):
        sg, m = record(model, x, y, torch.full((5,), -1), 2, backend="triton", mode=mode)
        assert (sg.gram() == 0).all()
        if mode == "store":
            sg.combine(torch.ones(2, device=DEVICE))
            assert all((p.grad == 0).all() for p in m.parameters())


def test_one_segment_plan_per_step(gen, monkeypatch):
    """Every layer of a step reads the same segment plan (Segments.memo)."""
    from orthograd_fast.kernels import gram_plan

    made = []
    real = gram_plan.segment_plan
    monkeypatch.setattr(gram_plan, "segment_plan", lambda ids, S: made.append(S) or real(ids, S))
    model, x, y, seg, S, gs = case("mlp", gen)
    for _ in range(2):
        made.clear()
        sg, _ = record(model, x, y, seg, S, backend="triton", mode="stream", method="explicit")
        assert len(triton_labels(sg)) == 3 and made == [S], made
    check_grams(sg, gs)


# --------------------------------------------------------------------------------------
# the cancellation safeguard with the ghost kernel
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixed", [False, True], ids=["all", "mixed"])
@pytest.mark.parametrize("dp", [128, 8])
@pytest.mark.parametrize("eps", [EPS[0], 1e-2, 1e-5])
def test_ghost_kernel_cancellation(eps, dp, mixed, gen):
    """test_ghost_cancellation's inputs through the ghost kernel: no worse than the
    explicit path (8x its error + u|K|), never a negative diagonal, weight and bias; no
    cancellation, the fp64 redo's regime, and the one that made the fp32 ghost's diagonal
    negative."""
    x, D = cancelling_rows(6, 4, dp, dp, eps, gen, mixed)
    seg, opts = Segments(IDS.to(DEVICE), CS), GramOptions(backend="triton")
    rows = [LinearRows(x.to(DEVICE), D.to(DEVICE), {})]
    Kt, Kbt = true_grams(x, D, IDS, CS)
    Kg, Kbg = matrix_triton.gram_ghost(rows, seg, opts, bias=True)
    Ke, _ = matrix.gram_explicit(rows, seg, opts)
    Kbe = gram_from_row_grads(rows[0].bias_rows(), seg, "fast")
    assert_no_worse(Kg.cpu(), Ke.cpu(), Kt, "weight")
    assert_no_worse(Kbg.cpu(), Kbe.cpu(), Kbt, "bias")


def test_ghost_kernel_weak_paths(gen, monkeypatch):
    """The same redo decisions as the torch path (test_ghost_cancellation
    .test_weak_segment_paths): none for sound rows or mild cancellation, fp64 rows then a
    flash-Gram block for the segments weak in fp64 too, the whole layer when fp64 rows
    cost more."""
    calls = []
    real = matrix_triton.gram_explicit

    def spy(c, seg, opts, keep=False):
        calls.append(seg.S)
        return real(c, seg, opts, keep)

    monkeypatch.setattr(matrix_triton, "gram_explicit", spy)
    for dp, eps, expected in [(128, 1e-2, []), (128, 1e-6, [4]), (8, 1e-2, [CS]), (128, None, [])]:
        calls.clear()
        if eps is None:
            x, D = torch.randn(6, 1, dp, generator=gen), torch.randn(6, 1, dp, generator=gen)
        else:
            x, D = cancelling_rows(6, 4, dp, dp, eps, gen)
        rows = [LinearRows(x.to(DEVICE), D.to(DEVICE), {})]
        seg = Segments(IDS.to(DEVICE), CS)
        Kg, _ = matrix_triton.gram_ghost(rows, seg, GramOptions(backend="triton"))
        assert calls == expected, (dp, eps, calls)
        Ke, _ = matrix.gram_explicit(rows, seg, GramOptions())
        assert_no_worse(Kg.cpu(), Ke.cpu(), true_grams(x, D, IDS, CS)[0], (dp, eps))


# --------------------------------------------------------------------------------------
# backend choice and errors
# --------------------------------------------------------------------------------------
def test_fp64_rows_are_refused_by_name(gen):
    model, x, y, seg, S, _ = case("mlp", gen)
    with pytest.raises(ValueError, match=r"layer weight '0\.weight'.*float64.*backend='auto'"):
        record(model.double(), x.double(), y, seg, S, backend="triton")


def test_precision_high_is_refused():
    with pytest.raises(ValueError, match="precision='high'"):
        SampleGram(nn.Linear(3, 2), backend="triton", precision="high")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU's choices")
def test_backend_choice_on_cpu(gen, monkeypatch):
    """auto keeps the CPU on the torch path (also with the interpreter on); a named
    backend that cannot run says why at construction."""
    model, x, y, seg, S, gs = case("mlp", gen)
    sg, _ = record(model, x, y, seg, S, backend="auto", mode="stream")
    assert not any("[triton]" in v for v in sg.coverage().values())
    check_grams(sg, gs)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device, and TRITON_INTERPRET=1 is not set"):
        SampleGram(model, backend="triton")
    SampleGram(model, backend="auto")  # falls back quietly
    with pytest.raises(ValueError, match="backend"):
        SampleGram(model, backend="cuda")
