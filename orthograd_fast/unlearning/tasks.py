"""Tasks: how a loader's batches reach the model and become per-row losses.

A task turns each batch a loader yields into a pair (x, y) of tensors with one row per
sample (``prepare``, which also checks the data), makes a forget pair and a retain pair
concatenable (``align``), wraps the model into the module the methods call with x
(``wrap``), and gives per-row losses and accuracy counts of the outputs. Every method
and the stopping rules go through it, so a model, a loss or a batch format is supported
by all of them at once.

``Classification(loss_fn=None)`` (``task="classification"``): batches as
``orthograd_fast.batches`` reads them (``OrthoGrad.step`` reads the same):

* (inputs, targets) pairs: inputs a tensor (N, ...) called as ``model(x)``, or a tuple of
  tensors ((ids, mask), labels) called as ``model(ids, mask)``;
* a dict with ``labels`` (a Hugging Face collator's batch, e.g. BERT sequence
  classification): targets = ``labels``, the model called as ``model(**other entries)``
  (input_ids, attention_mask, token_type_ids, ...).

A flat batch of three or more tensors (``TensorDataset(ids, mask, labels)``) is refused:
which one holds the targets would be a guess (the attention mask was once read as the
targets). Rows are dim 0 of every input tensor. Loss: ``loss_fn(outputs, targets) ->
(N,)`` per-sample losses, default cross-entropy on the logits (N, C) against class
indices (N,) in [0, C) (or class probabilities, floating (N, C)); other targets — (N, 1),
labels outside the classes, a binary model's (N, 1) logits — are refused with the fix
named, as are floating inputs of another dtype than the model's parameters (numpy's
float64). Accuracy: argmax over classes when the logits are (N, C) and the targets class
indices (N,), else none (the forget-accuracy stopping rule is then off). Forget and
retain inputs must have one shape per row (dict batches: pad both loaders to one length);
if they differ, the error says exactly how.

Model outputs: a logits tensor, an object with a ``.logits`` tensor (a Hugging Face
``ModelOutput``, a dataclass, a NamedTuple) or a dict with a ``"logits"`` tensor. Any
other output (a plain tuple, a dict without logits) needs ``loss_fn``. OrthoGrad's
per-sample Gram engine finds the output rows through torch's pytree, so an output object
it cannot traverse is refused there with a clear error.

``CausalLM(pad_id=0, loss_fn=None)`` (``task="lm"``): causal language models, rows =
sequences. A batch is a dict with ``input_ids`` (N, T) and optionally ``attention_mask``
and ``labels`` (a Hugging Face tokenizer or collator's output), or a tuple (input_ids,),
(input_ids, labels) or (input_ids, attention_mask, labels), or an input_ids tensor.
Missing labels are the input ids, with -100 where the attention mask is 0. Loss: the mean
next-token NLL of each sequence over its labelled tokens (``losses.token_nll_rows``;
labels == -100 ignored). Accuracy: next-token top-1 over the labelled tokens.

Sequences of different lengths (a forget batch of length 12 and a retain batch of 20,
or loaders that pad each batch to its own longest sequence) are padded on the right to a
common length: input id ``pad_id``, attention mask 0, label -100. This is exact for a
causal model: a token attends only to earlier positions, so tokens appended on the right
change no earlier output, and their labels are ignored, so every loss and every gradient
is the one of the unpadded sequence. (The pad id's value is therefore immaterial; the
default is the model's ``config.pad_token_id``, else its ``eos_token_id``, else 0.)

The model is called as ``model(input_ids, attention_mask=..., position_ids=...)``, each
keyword passed only when its ``forward`` names it. Position ids count the row's own
tokens: cumsum(attention_mask) − 1 (0 on padding), so a left-padded sequence's tokens get
the positions they have unpadded (with 0..T−1 for every row, GPT-2's absolute position
embeddings shifted a left-padded row: its step was 0.11-0.18 off orthogonal to its
unpadded gradient); passed as an (N, T) tensor, one row per sequence.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .. import batches as _batches
from .losses import IGNORE_INDEX, cross_entropy_rows, token_correct, token_nll_rows

TASKS = ("classification", "lm")


def _check_finite(t: torch.Tensor, what: str, part: str) -> None:
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            row = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0, 0]) if t.dim() else 0
            raise ValueError(
                f"{what}: the {part} hold NaN or Inf (row {row}); the data is not finite, so "
                "no step is taken (clean or drop those samples)"
            )


def _rows(per_row: torch.Tensor, n: int, who: str) -> torch.Tensor:
    if not isinstance(per_row, torch.Tensor) or per_row.dim() != 1 or per_row.shape[0] != n:
        shape = tuple(per_row.shape) if isinstance(per_row, torch.Tensor) else type(per_row).__name__
        raise ValueError(f"{who} must return per-sample losses of shape ({n},), got {shape}")
    return per_row


class Task:
    """Interface (module doc). Subclasses set ``name`` and implement the methods."""

    name = "task"
    unsupported_methods: tuple[str, ...] = ()

    def prepare(self, batch, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One loader batch -> (x (N, ...), y (N, ...)), checked (ValueError naming ``what``)."""
        raise NotImplementedError

    def align(self, forget, retain):
        """Make a prepared forget pair and retain pair concatenable along dim 0."""
        raise NotImplementedError

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the methods call with x (the model itself, or an adapter around it)."""
        return model

    def row_losses(self, out, y: torch.Tensor) -> torch.Tensor:
        """Per-row losses (N,) of the wrapped model's output on x."""
        raise NotImplementedError

    def accuracy_counts(self, out, y: torch.Tensor) -> tuple[int, int] | None:
        """(correct, total) of a batch, or None where accuracy is not defined."""
        return None

    def class_labels(self, y: torch.Tensor) -> set[int] | None:
        """The class labels of a batch (class forgetting is detected from them), or None."""
        return None

    def check_method(self, method: str) -> None:
        if method in self.unsupported_methods:
            raise ValueError(f"method {method!r} is not available for task {self.name!r}")


class Classification(Task):
    """(inputs, targets) batches; cross-entropy or ``loss_fn`` (module doc)."""

    name = "classification"

    def __init__(self, loss_fn: Callable | None = None):
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable(outputs, targets) -> (N,) losses, got {loss_fn!r}")
        self.loss_fn = loss_fn

    def prepare(self, batch, what):
        if isinstance(batch, Mapping) and _batches.LABELS not in batch:
            raise ValueError(
                f"{what}: a dict batch (keys {sorted(map(str, batch))}) without 'labels': classification "
                "reads the targets from 'labels' and calls model(**the other entries); for a causal "
                "language model (labels = the input ids) pass task='lm'"
            )
        x, y, _ = _batches.split_batch(batch, what)
        _batches.check_finite(x, what)
        _check_finite(y, what, "targets")
        return x, y

    def align(self, forget, retain):
        (xf, yf), (xr, yr) = forget, retain
        problem = _batches.align_problem(xf, xr)
        if problem is None and yf.shape[1:] != yr.shape[1:]:
            problem = (f"the targets differ in shape beyond the batch dimension: a forget row is "
                       f"{tuple(yf.shape[1:])}, a retain row {tuple(yr.shape[1:])}")
        if problem is None and yf.is_floating_point() != yr.is_floating_point():
            problem = f"the forget targets are {yf.dtype} but the retain targets {yr.dtype}"
        if problem is not None:
            raise ValueError(
                f"forget and retain batches cannot be concatenated: {problem}; both loaders must yield one "
                "shape per row (pad or resize to a common shape; a causal language model: task='lm' pads "
                "sequences itself)"
            )
        return forget, retain

    def row_losses(self, out, y):
        if self.loss_fn is None:
            return cross_entropy_rows(out, y)
        return _rows(self.loss_fn(out, y), y.shape[0], "loss_fn")

    def accuracy_counts(self, out, y):
        logits = _batches.logits_of(out)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or y.dim() != 1 or y.is_floating_point():
            return None
        return int((logits.argmax(1) == y).sum()), int(y.shape[0])

    def class_labels(self, y):
        if y.dim() != 1 or y.is_floating_point():
            return None
        return set(y.tolist())


class CausalLMAdapter(nn.Module):
    """Calls a causal LM on packed rows x (N, 2, T) = [input_ids; attention_mask] (module doc).

    Returns the model's output unchanged (a tensor of logits or an output with ``.logits``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        try:
            names = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            names = {}
        self.takes_mask = "attention_mask" in names
        self.takes_positions = "position_ids" in names

    def forward(self, x: torch.Tensor):
        ids, mask = x[:, 0], x[:, 1]  # [N, T] each
        kw = {}
        if self.takes_mask:
            kw["attention_mask"] = mask
        if self.takes_positions:  # from the mask: a left-padded row's first token is position 0
            kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.model(ids, **kw)


class CausalLM(Task):
    """Causal language models, rows = sequences (module doc)."""

    name = "lm"
    unsupported_methods = ("random_label", "scrub")

    def __init__(self, pad_id: int = 0, loss_fn: Callable | None = None, ignore_index: int = IGNORE_INDEX):
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id must be a token id (an int >= 0), got {pad_id!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable(outputs, labels) -> (N,) losses, got {loss_fn!r}")
        self.pad_id, self.loss_fn, self.ignore_index = pad_id, loss_fn, ignore_index

    def prepare(self, batch, what):
        mask = labels = None
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(f"{what}: a language-model batch needs 'input_ids'; it has {sorted(batch)}")
            ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
        elif isinstance(batch, torch.Tensor):
            ids = batch
        elif isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
            ids = batch[0]
            if len(batch) == 2:
                labels = batch[1]
            elif len(batch) == 3:
                mask, labels = batch[1], batch[2]
        else:
            raise ValueError(
                f"{what}: a language-model batch is a dict with input_ids (and attention_mask, "
                "labels), a tuple (input_ids[, attention_mask], labels) or an input_ids tensor; "
                f"got {type(batch).__name__}"
            )
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{what}: input_ids must be an integer tensor (N, T), got {shape}")
        n, t = ids.shape
        if n == 0:
            raise ValueError(f"{what}: an empty batch")
        if bool((ids < 0).any()):
            raise ValueError(f"{what}: input_ids hold negative ids")
        if mask is None:
            mask = torch.ones_like(ids)
        elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{what}: attention_mask must be a 0/1 tensor of the input_ids' shape {tuple(ids.shape)}")
        if labels is None:
            labels = ids.masked_fill(mask == 0, self.ignore_index)
        elif not isinstance(labels, torch.Tensor) or labels.shape != ids.shape or labels.is_floating_point():
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{what}: labels must be an integer tensor of the input_ids' shape {tuple(ids.shape)}, "
                             f"got {shape}")
        # a token whose previous position is padding is its sequence's first: never predicted
        # (left padding would otherwise add a pad -> first-token term the unpadded row lacks)
        labels = labels.clone()
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, self.ignore_index)
        empty = (labels[:, 1:] != self.ignore_index).sum(1) == 0
        if bool(empty.any()):
            raise ValueError(
                f"{what}: sequence {int(empty.nonzero()[0, 0])} has no labelled token to predict (all its "
                f"labels after the first are {self.ignore_index}, or it is one token long)"
            )
        return torch.stack([ids.long(), mask.long()], 1), labels.long()  # [N, 2, T], [N, T]

    def _pad(self, x: torch.Tensor, y: torch.Tensor, t: int):
        extra = t - x.shape[-1]
        if extra == 0:
            return x, y
        fill = x.new_zeros(x.shape[0], 2, extra)
        fill[:, 0] = self.pad_id
        return torch.cat([x, fill], -1), torch.cat([y, y.new_full((y.shape[0], extra), self.ignore_index)], -1)

    def align(self, forget, retain):
        t = max(forget[0].shape[-1], retain[0].shape[-1])
        return self._pad(*forget, t), self._pad(*retain, t)

    def wrap(self, model):
        return CausalLMAdapter(model)

    def row_losses(self, out, y):
        if self.loss_fn is not None:
            return _rows(self.loss_fn(out, y), y.shape[0], "loss_fn")
        return token_nll_rows(out, y, self.ignore_index)

    def accuracy_counts(self, out, y):
        return token_correct(out, y, self.ignore_index)


def default_pad_id(model: nn.Module) -> int:
    """The model's ``config.pad_token_id``, else its ``eos_token_id``, else 0 (module doc);
    an id outside ``config.vocab_size`` is skipped (tiny test configs keep GPT-2's 50256)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "eos_token_id"):
        v = getattr(config, key, None)
        if isinstance(v, (list, tuple)) and v:
            v = v[0]
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (not isinstance(vocab, int) or v < vocab):
            return v
    return 0


def make_task(task, model: nn.Module, *, loss_fn=None, pad_id: int | None = None) -> Task:
    """A :class:`Task` from ``task``: "classification", "lm", or a Task instance."""
    if isinstance(task, Task):
        if loss_fn is not None or pad_id is not None:
            raise ValueError("loss_fn and pad_id belong to the Task instance passed as task")
        return task
    if task == "classification":
        if pad_id is not None:
            raise ValueError("pad_id applies to task='lm' only")
        return Classification(loss_fn)
    if task == "lm":
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if pad_id is not None and isinstance(vocab, int) and isinstance(pad_id, int) and pad_id >= vocab:
            raise ValueError(f"pad_id {pad_id} is outside the model's vocabulary (config.vocab_size {vocab})")
        return CausalLM(default_pad_id(model) if pad_id is None else pad_id, loss_fn)
    raise ValueError(f"task must be one of {TASKS} or a Task instance, got {task!r}")
