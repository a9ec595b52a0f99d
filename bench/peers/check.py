"""Correctness of a peer's step against an fp64 reference on the same inputs.

``reference_check`` recomputes, in fp64 on a copy of the model at the weights the step
started from, the forget gradient g_u and the per-sample retain gradients G (rows g_i, by
``torch.func`` vmap, a few parameter tensors at a time so that at most ``group_bytes`` of G
is alive), and for each rank tolerance asked for, the reference direction r_ref = g_u⊥
(per tensor or global, as the peers project):

    K = G Gᵀ (fp64), rank decided on the cosine matrix diag(K)^-1/2 K diag(K)^-1/2 by
    eigh, keeping σ_k > rtol·σ_max (DESIGN.md §3); c = K⁺ G g_u; r = g_u - Gᵀc;
    then two refinement passes c' = K⁺ G r, r -= Gᵀc'.

All of it is fp64 arithmetic on fp64 gradients; tests/test_bench_peers.py checks it
against ``reference.project_svd`` (fp64 SVD), which is too slow for the (128, 1e6)
tensors of the benchmark (~1 min each on this CPU). For every peer's applied direction
d (r = -d):

    orthogonality = ‖G r‖ / (‖G‖₂ ‖r‖)        G the global (B, P) fp64 matrix
    error         = ‖r - r_ref‖ / ‖r_ref‖       r_ref computed with that peer's rtol
    kept          = ‖r‖ / ‖g_u‖

Which rtol: the QR peers have no rank rule, i.e. they remove every direction fp32 can
resolve, so their reference uses ``EXACT_RTOL`` (1e-7, the fp64 Gram's resolution); the
package drops directions under its own rtol (``OrthoGrad.rtol``), and its reference uses
that. ``orthogonality``, against the full G, shows what any dropped direction costs.
A zero r is orthogonal to everything: ``error`` is what catches a peer that returns
nothing. ``condition``: the smallest σ_min/σ_max of the row-normalised per-sample
gradients over the parameter tensors with more entries than B.
"""
from __future__ import annotations

import copy
import math

import torch
from torch.func import functional_call, grad, vmap

# Gates of bench_peers.py. Measured on the benchmark's own rows (CPU, fp32 models):
# correct peers reach orthogonality <= 2e-4 (fp32 Householder QR of the (1e6, 128)
# tensors of mlp-1024) and error <= 6e-3 (QR over-projecting the digits MLP's hidden bias,
# which has exactly B = 128 entries, where the fp64 rank rule keeps a direction). Bugs:
# one retain sample left out gives orthogonality 2e-3..2e-2 and error 3e-2..6e-2;
# projecting globally instead of per tensor, error >= 0.2; against the mean retain
# gradient only, orthogonality >= 0.27; zero or the wrong sign, error 1 or 2.
MAX_ORTHOGONALITY = 1e-3
MAX_ERROR = 1e-2
EXACT_RTOL = 1e-7
REFINE = 2


def _to64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def _groups(named, B: int, group_bytes: int):
    group, size = [], 0
    for n, p in named:
        nbytes = B * p.numel() * 8
        if group and size + nbytes > group_bytes:
            yield group
            group, size = [], 0
        group.append((n, p))
        size += nbytes
    if group:
        yield group


def gram_pinv64(K: torch.Tensor, rtol: float) -> tuple[torch.Tensor, int, float]:
    """fp64 pseudo-inverse of a Gram K (B, B) on its numerical rank (module doc).

    Returns (K⁺ (B, B), rank, σ_min/σ_max of the row-normalised rows, zero rows dropped).
    """
    d = torch.diagonal(K).clone()
    keep = d > 0
    pinv = torch.zeros_like(K)
    if not bool(keep.any()):
        return pinv, 0, 1.0
    s = d[keep].rsqrt()
    C = K[keep][:, keep] * s[:, None] * s[None, :]
    lam, V = torch.linalg.eigh(0.5 * (C + C.T))
    sigma = lam.clamp_min(0).sqrt()
    k = sigma > rtol * sigma[-1]
    W = V[:, k] * lam[k].rsqrt()  # C⁺ = W Wᵀ on the kept directions
    sub = (s[:, None] * W) @ (s[:, None] * W).T
    idx = keep.nonzero().squeeze(1)
    pinv[idx[:, None], idx[None, :]] = sub
    return pinv, int(k.sum()), float(sigma[0] / sigma[-1])


def _project(gs: list[torch.Tensor], Gs: list[torch.Tensor], K: torch.Tensor, rtol: float):
    """g⊥ of the concatenated gs [(P_t,)] against rows of the concatenated Gs [(B, P_t)]."""
    pinv, rank, _ = gram_pinv64(K, rtol)
    r = [g.clone() for g in gs]
    for _ in range(1 + REFINE):
        c = pinv @ sum(G @ x for G, x in zip(Gs, r))
        for x, G in zip(r, Gs):
            x -= G.T @ c
    return r, rank


def reference_check(model, loss_fn, forget, retain, directions: dict[str, dict[str, torch.Tensor]],
                    rtols: dict[str, float] | None = None, *, granularity: str = "per_tensor",
                    group_bytes: int = 256 << 20):
    """Check applied directions against the fp64 reference (module doc).

    model: the network at the weights the steps started from (not modified; an fp64 copy
    is made). forget, retain: (x, y) batches as given to the steps. directions:
    {peer: {param name: .grad after its step}} (the applied direction, -g_u⊥). rtols:
    {peer: rank tolerance of its reference} (default ``EXACT_RTOL``).
    Returns (reference stats {rank: {rtol: rank}, condition, ref_orthogonality: {rtol: ..},
    ref_kept: {rtol: ..}}, {peer: {"orthogonality", "error", "kept", "rtol"}}).
    """
    rtols = {k: (rtols or {}).get(k, EXACT_RTOL) for k in directions}
    tols = sorted(set(rtols.values())) or [EXACT_RTOL]
    m64 = copy.deepcopy(model).double()
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    buffers = {n: b.detach() for n, b in m64.named_buffers()}
    xf, yf = (_to64(t) for t in forget)
    xr, yr = (_to64(t) for t in retain)
    B = xr.shape[0]
    g_u = dict(zip([n for n, _ in named], torch.autograd.grad(loss_fn(m64(xf), yf).mean(), [p for _, p in named])))
    zeros = lambda: torch.zeros(B, dtype=torch.float64, device=xr.device)  # noqa: E731
    K = torch.zeros(B, B, dtype=torch.float64, device=xr.device)
    acc = {k: {"Gr": zeros(), "rr": 0.0, "diff": 0.0} for k in directions}
    ref = {t: {"Gr": zeros(), "rr": 0.0, "rank": 0} for t in tols}
    uu, cond = 0.0, 1.0
    kept_G: dict[str, torch.Tensor] = {}

    def account(name: str, Gt: torch.Tensor, r_refs: dict[float, torch.Tensor]):
        for t, r in r_refs.items():
            ref[t]["Gr"] += Gt @ r
            ref[t]["rr"] += float(r @ r)
        for k, d in directions.items():
            r = -d[name].reshape(-1).to(device=Gt.device, dtype=torch.float64)
            acc[k]["Gr"] += Gt @ r
            acc[k]["rr"] += float(r @ r)
            acc[k]["diff"] += float((r - r_refs[rtols[k]]).square().sum())

    for group in _groups(named, B, group_bytes):
        wrt = [n for n, _ in group]
        const = {n: p.detach() for n, p in named if n not in wrt}

        def sample_loss(params, x, y):
            out = functional_call(m64, ({**params, **const}, buffers), (x[None],))
            return loss_fn(out, y[None]).sum()

        G = vmap(grad(sample_loss), in_dims=(None, 0, 0))({n: p.detach() for n, p in group}, xr, yr)
        for n in wrt:
            Gt, gt = G[n].reshape(B, -1), g_u[n].reshape(-1)
            Kt = Gt @ Gt.T
            K += Kt
            uu += float(gt @ gt)
            if Gt.shape[1] > B:
                cond = min(cond, gram_pinv64(Kt, 0.0)[2])
            if granularity == "per_tensor":
                r_refs = {}
                for t in tols:
                    (r_refs[t],), rank = _project([gt], [Gt], Kt, t)
                    ref[t]["rank"] += rank
                account(n, Gt, r_refs)
            else:
                kept_G[n] = Gt
        del G
    if granularity == "global":
        names = list(kept_G)
        flat = {}
        for t in tols:
            flat[t], ref[t]["rank"] = _project([g_u[n].reshape(-1) for n in names], [kept_G[n] for n in names], K, t)
        for i, n in enumerate(names):
            account(n, kept_G[n], {t: flat[t][i] for t in tols})
    norm_G = math.sqrt(max(float(torch.linalg.eigvalsh(K)[-1]), 0.0))

    def orth(v: torch.Tensor, sq: float) -> float:
        den = norm_G * math.sqrt(sq)
        return float(v.norm()) / den if den > 0 else 0.0

    stats = {
        "rank": {f"{t:g}": ref[t]["rank"] for t in tols},
        "condition": cond,
        "ref_orthogonality": {f"{t:g}": orth(ref[t]["Gr"], ref[t]["rr"]) for t in tols},
        "ref_kept": {f"{t:g}": math.sqrt(ref[t]["rr"] / uu) if uu > 0 else 0.0 for t in tols},
    }
    out = {}
    for k, a in acc.items():
        rr_ref = ref[rtols[k]]["rr"]
        out[k] = {
            "orthogonality": orth(a["Gr"], a["rr"]),
            "error": math.sqrt(a["diff"] / rr_ref) if rr_ref > 0 else math.sqrt(a["diff"]),
            "kept": math.sqrt(a["rr"] / uu) if uu > 0 else 0.0,
            "rtol": rtols[k],
        }
    return stats, out


def gate(result: dict) -> str | None:
    """None when a checked peer result passes, else why it fails (no timing is reported)."""
    o, e = result["orthogonality"], result["error"]
    if not (math.isfinite(o) and math.isfinite(e)):
        return f"non-finite check (orthogonality {o}, error {e})"
    if o > MAX_ORTHOGONALITY:
        return f"orthogonality {o:.1e} > {MAX_ORTHOGONALITY:.0e}"
    if e > MAX_ERROR:
        return f"differs from the fp64 projection by {e:.1e} > {MAX_ERROR:.0e}"
    return None
