"""What a batch holds and how its inputs reach the model (``OrthoGrad.step`` and the toolkit).

A batch is an (inputs, targets) pair, or a mapping with a ``"labels"`` entry (a Hugging Face
collator's output: targets = ``labels``, inputs = every other entry). Its inputs are

* a tensor x (N, ...): called as ``model(x)``;
* a tuple (or list) of tensors (x1, x2, ...), each (N, ...): ``model(x1, x2, ...)``;
* a mapping of tensors {name: (N, ...)}: ``model(**inputs)`` (input_ids, attention_mask,
  token_type_ids, pixel_values, ...).

Rows are dim 0 of every input tensor; every input must hold the same N rows (a tensor
shared by all rows cannot be concatenated with another batch's: build it inside the model
or bind it with ``functools.partial``). A flat tuple of three or more tensors, such as a
``TensorDataset(ids, mask, labels)`` batch, is refused: which of them are the targets is a
guess (taking the second as the targets trained on the attention mask); group the inputs,
((ids, mask), labels), or yield a dict with ``labels``.

Checks, each a ValueError naming the batch (``what``), before any model call:

* ``check_finite``: NaN/Inf in a floating input, with the rows of *that* batch (not of a
  concatenation of forget and retain rows);
* ``check_dtype``: a floating input of another dtype than the model's parameters (numpy's
  float64 data with an fp32 model: torch would say "mat1 and mat2 must have the same
  dtype" from inside the model). fp16/bf16 data with an fp32 model and fp32 data with an
  fp16/bf16 model pass (autocast, or a model that casts its inputs);
* ``class_target_problem``: targets the default cross-entropy cannot take, checked against
  the logits before ``F.cross_entropy`` (whose errors — "0D or 1D target tensor expected",
  "Target 7 is out of bounds" — name neither the argument nor the fix).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

LABELS = "labels"


def _kind(x) -> str:
    if isinstance(x, Mapping):
        return "mapping"
    return "tuple" if isinstance(x, (tuple, list)) else "tensor"


def leaves(x) -> list[tuple[str, torch.Tensor]]:
    """[(name, tensor)] of the inputs: "" for a tensor, "0", "1", ... for a tuple, the keys of a mapping."""
    kind = _kind(x)
    if kind == "mapping":
        return [(str(k), v) for k, v in x.items()]
    if kind == "tuple":
        return [(str(i), v) for i, v in enumerate(x)]
    return [("", x)]


def _label(name: str) -> str:
    return "the inputs" if name == "" else f"input {name!r}"


def split_batch(batch, what: str):
    """(inputs, targets, N) of one batch (module doc); ValueError naming ``what`` otherwise."""
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise ValueError(
                f"{what}: a dict batch (keys {sorted(map(str, batch))}) has no 'labels' entry: the targets; a "
                "dict batch is {input name: tensor, ..., 'labels': targets}, the model called with the other "
                "entries as keywords"
            )
        inputs = {k: v for k, v in batch.items() if k != LABELS}
        targets = batch[LABELS]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    elif isinstance(batch, (tuple, list)) and len(batch) > 2:
        raise ValueError(
            f"{what}: a batch of {len(batch)} elements; a batch is an (inputs, targets) pair, and which of "
            f"{len(batch)} tensors are the targets is ambiguous (TensorDataset(ids, mask, labels)?). Group "
            "the model's inputs, ((ids, mask), labels), called as model(ids, mask); or yield a dict "
            "{'input_ids': ..., 'attention_mask': ..., 'labels': ...}, called as model(**inputs)"
        )
    else:
        raise ValueError(f"{what}: a batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{what}: the targets must be a tensor, got {type(targets).__name__}")
    n = rows(inputs, what)
    if targets.dim() == 0 or targets.shape[0] != n:
        raise ValueError(f"{what}: {n} inputs but targets of shape {tuple(targets.shape)}")
    return inputs, targets, n


def rows(x, what: str) -> int:
    """N: the rows (dim 0) every input tensor holds; ValueError if they differ or are none."""
    if _kind(x) != "tensor" and len(x) == 0:
        raise ValueError(f"{what}: the inputs are an empty {type(x).__name__}")
    n = None
    for name, t in leaves(x):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {_label(name)} must be a tensor with the rows in dim 0, got "
                             f"{type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{what}: {_label(name)} is a 0-dim tensor; inputs hold the rows in dim 0")
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise ValueError(f"{what}: the inputs hold different numbers of rows in dim 0 "
                             f"({ {k: tuple(v.shape) for k, v in leaves(x)} }); each must hold the batch's rows")
    if n == 0:
        raise ValueError(f"{what} is empty (0 rows)")
    return n


def call(model, x):
    """model(x), model(*x) or model(**x) (module doc)."""
    kind = _kind(x)
    if kind == "mapping":
        return model(**x)
    if kind == "tuple":
        return model(*x)
    return model(x)


def cat_rows(a, b):
    """a's rows, then b's (dim 0), for inputs of one structure; b's floating tensors cast to
    a's dtype and device. Callers check the structure and shapes first (``align_problem``)."""
    kind = _kind(a)
    if kind == "mapping":
        return {k: _cat(v, b[k]) for k, v in a.items()}
    if kind == "tuple":
        return type(a)(_cat(u, v) for u, v in zip(a, b))
    return _cat(a, b)


def _cat(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    v = v.to(device=u.device, dtype=u.dtype if v.is_floating_point() and u.is_floating_point() else v.dtype)
    return torch.cat([u, v])


def align_problem(a, b, first: str = "forget", second: str = "retain") -> str | None:
    """Why inputs ``a`` and ``b`` cannot be concatenated along dim 0 (None if they can)."""
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        return f"the {first} inputs are a {ka} but the {second} inputs a {kb}"
    if ka == "mapping" and set(a) != set(b):
        return f"the {first} inputs have keys {sorted(map(str, a))} but the {second} inputs {sorted(map(str, b))}"
    if ka == "tuple" and len(a) != len(b):
        return f"the {first} inputs are {len(a)} tensors but the {second} inputs {len(b)}"
    other = dict(leaves(b))
    for name, u in leaves(a):
        v = other[name]
        verb = ("differ", "are") if name == "" else ("differs", "is")
        if u.shape[1:] != v.shape[1:]:
            fix = (" (pad both loaders to one length, e.g. a tokenizer's padding='max_length')" if ka == "mapping"
                   else "")
            return (f"{_label(name)} {verb[0]} in shape beyond the batch dimension: a {first} row is "
                    f"{tuple(u.shape[1:])}, a {second} row {tuple(v.shape[1:])}{fix}")
        if u.is_floating_point() != v.is_floating_point():
            return f"{_label(name)} {verb[1]} {u.dtype} in the {first} batch but {v.dtype} in the {second} batch"
    return None


def check_finite(x, what: str) -> None:
    """ValueError if a floating input holds NaN/Inf, naming its rows in this batch."""
    for name, t in leaves(x):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                rows_bad = bad.reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist() if t.dim() else [0]
                shown = (f"row {rows_bad[0]}" if len(rows_bad) == 1 else
                         f"rows {rows_bad[:8]}{' ...' if len(rows_bad) > 8 else ''}")
                raise ValueError(
                    f"{what}: {_label(name)} hold NaN or Inf ({shown}); the data is not finite, so no step is "
                    "taken (clean or drop those samples)"
                )


_MIXED_OK = ({torch.float16, torch.float32}, {torch.bfloat16, torch.float32})


def param_dtype(model) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def check_dtype(x, dtype: torch.dtype | None, what: str) -> None:
    """ValueError if a floating input's dtype does not go with parameters of ``dtype`` (module doc)."""
    if dtype is None:
        return
    for name, t in leaves(x):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype \
                and {t.dtype, dtype} not in _MIXED_OK:
            raise ValueError(
                f"{what}: {_label(name)} {'are' if name == '' else 'is'} {t.dtype} but the model's parameters are "
                f"{dtype}: cast the data (x.to({dtype}); numpy arrays are float64) or the model (model.to({t.dtype}))"
            )


def logits_of(out):
    """The logits of a model output: a tensor, an object with a ``.logits`` tensor (Hugging Face
    ModelOutput, dataclasses, NamedTuples) or a mapping with a ``"logits"`` tensor; else None."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    return None


def class_target_problem(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None,
                         where=lambda r: f"row {r}") -> str | None:
    """Why cross-entropy of ``logits`` (N, C) against ``targets`` is not defined row by row
    (None if it is): targets are class indices (N,) in [0, C) (or ``ignore_index``), or
    class probabilities, floating (N, C). Names the fix; ``where(r)`` names row r."""
    use = "pass loss_fn(outputs, targets) -> per-sample losses (N,)"
    if logits.dim() != 2:
        return (f"the default loss is cross-entropy over (N, C) logits, but the model returns logits of shape "
                f"{tuple(logits.shape)}; for another output {use}")
    n, c = logits.shape
    if c == 1:
        return ("the model returns one logit per row (N, 1), and cross-entropy over one class is 0 for every "
                "row: for a binary model pass loss_fn=lambda out, y: F.binary_cross_entropy_with_logits("
                "out.squeeze(1), y.float(), reduction='none'), or give the model 2 outputs")
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            return (f"floating targets are class probabilities of the logits' shape {tuple(logits.shape)}, got "
                    f"{tuple(targets.shape)}; class indices are an integer tensor ({n},), or {use}")
        return None
    if targets.dtype == torch.bool or targets.is_complex():
        return f"targets must be class indices (an integer tensor ({n},)), got {targets.dtype}"
    if targets.dim() == 2 and targets.shape[1] == 1:
        return f"targets of shape {tuple(targets.shape)}: class indices are ({n},); pass y.squeeze(1) (or {use})"
    if targets.dim() != 1:
        return f"class-index targets are ({n},), got {tuple(targets.shape)}; for other targets {use}"
    bad = (targets < 0) | (targets >= c)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        also = f" (or ignore_index {ignore_index})" if ignore_index is not None else ""
        return (f"target {int(targets[row])} ({where(row)}) is outside the model's {c} classes [0, {c}){also}; "
                "labels must be 0..C-1 (remap them, or size the model's last layer to the classes)")
    return None
