"""Stock Hugging Face models from tiny configs (no download), called as users call them.

Each builder returns ``(model, make_batch, per_row_loss)``:

* ``model``: an untouched ``transformers`` (or ``peft``) model, weights drawn from torch's
  global RNG (seed it first), in eval mode (dropout off: the engine's fallbacks cannot
  replay random draws), fp32; ``.double()`` for fp64;
* ``make_batch(N, gen) -> batch``: a dict of tensors, every one with the N rows in dim 0;
  the model's keyword arguments plus ``"targets"`` (see :func:`forward`). Text is
  right-padded to a common length with ``attention_mask`` zeros on the padding (row
  lengths drawn per batch, at least one full and one padded row);
* ``per_row_loss(output, batch) -> (N,)``: each row's summed loss (token cross-entropy
  over the non-padding targets for language models, class cross-entropy otherwise), so
  that ``per_row_loss(...).sum()`` is a row-separable loss and the gradient of row r is
  exactly the gradient of the batch-size-1 loss of row r alone.

Sizes are chosen so that a sequence length can equal the batch size (the T == N layouts
of issue 8): :data:`SEQ` gives each model's per-row sequence length(s).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAD, BOS, EOS = 0, 1, 2
VOCAB = 100

#: per-row sequence lengths of each model's tensors (text: tokens; ViT: patches + CLS;
#: Whisper: encoder frames after the stride-2 conv, decoder tokens)
SEQ = {"gpt2": 8, "bert": 8, "vit": 10, "whisper": 8, "gpt2_lora": 8, "whisper_cls": 8}


def forward(model, batch: dict):
    """``model(**batch)`` without the ``"targets"`` entry (the loss is formed outside)."""
    return model(**{k: v for k, v in batch.items() if k != "targets"})


def to_dtype(batch: dict, dtype: torch.dtype) -> dict:
    """The batch with its floating tensors (pixels, audio features) cast to ``dtype``."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def rows(batch: dict, idx) -> dict:
    """Rows ``idx`` (a slice or index tensor) of every tensor of the batch (dim 0)."""
    return {k: v[idx] for k, v in batch.items()}


def _lengths(N: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(N,) row lengths in [T // 2, T], one row full and (N > 1) one row shortest."""
    lengths = torch.randint(T // 2, T + 1, (N,), generator=gen)
    lengths[0] = T
    if N > 1:
        lengths[1] = T // 2
    return lengths[torch.randperm(N, generator=gen)]


def _padded_text(N: int, T: int, gen: torch.Generator):
    """input_ids (N, T) of tokens in [3, VOCAB) right-padded with PAD; attention_mask (N, T)."""
    ids = torch.randint(3, VOCAB, (N, T), generator=gen)
    mask = (torch.arange(T)[None, :] < _lengths(N, T, gen)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) Σ_t CE(logits[:, t], labels[:, t]) over labels != -100; logits (N, T, V), labels (N, T)."""
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [N, T]
    return ce.sum(1)


# --------------------------------------------------------------------------------------
# GPT-2 (causal LM), BERT (sequence classification)
# --------------------------------------------------------------------------------------
def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )


def _lm_batch(N: int, gen: torch.Generator) -> dict:
    ids, mask = _padded_text(N, SEQ["gpt2"], gen)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "targets": labels}


def _lm_loss(out, batch: dict) -> torch.Tensor:
    """Next-token loss: logits at t predict the target at t + 1."""
    return token_ce(out.logits[:, :-1], batch["targets"][:, 1:])


def gpt2():
    """GPT2LMHeadModel: 2 layers, n_embd 32, 2 heads, vocab 100, T = 8 (right padding);
    lm_head is tied to transformer.wte (one parameter, as in the released model)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(_gpt2_config()).eval()
    return model, _lm_batch, _lm_loss


def gpt2_lora():
    """peft.get_peft_model(GPT-2 above, LoraConfig(r=4 on c_attn)): only the LoRA A/B
    matrices train. ``init_lora_weights=False`` draws B at random too (B = 0 at the default
    init would make every A gradient zero and its Gram trivially right)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel(_gpt2_config()).eval()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
        fan_in_fan_out=True, init_lora_weights=False,
    )
    model = get_peft_model(base, config).eval()
    return model, _lm_batch, _lm_loss


def _class_loss(out, batch: dict) -> torch.Tensor:
    """(N,) class cross-entropy of the logits against the targets."""
    return F.cross_entropy(out.logits, batch["targets"], reduction="none")


def bert():
    """BertForSequenceClassification: 2 layers, hidden 32, 2 heads, 3 labels, T = 8
    (right padding; no token_type_ids passed, so BERT reads its constant buffer)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
        num_labels=3, pad_token_id=PAD,
    )
    model = BertForSequenceClassification(config).eval()

    def make_batch(N, gen):
        ids, mask = _padded_text(N, SEQ["bert"], gen)
        return {"input_ids": ids, "attention_mask": mask, "targets": torch.randint(0, 3, (N,), generator=gen)}

    return model, make_batch, _class_loss


# --------------------------------------------------------------------------------------
# ViT (image classification), Whisper (speech-to-text, encoder-decoder)
# --------------------------------------------------------------------------------------
def vit():
    """ViTForImageClassification: 12x12 RGB images, 4x4 patches (9 + CLS = 10 tokens),
    2 layers, hidden 32, 2 heads, 3 labels."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=12, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )
    model = ViTForImageClassification(config).eval()

    def make_batch(N, gen):
        return {
            "pixel_values": torch.randn(N, 3, 12, 12, generator=gen),
            "targets": torch.randint(0, 3, (N,), generator=gen),
        }

    return model, make_batch, _class_loss


def whisper():
    """WhisperForConditionalGeneration (the full encoder-decoder, not the audio
    classifier): 8 mel bins x 16 frames (two convolutions, the second stride 2: 8 encoder
    positions), d_model 32, 2 + 2 layers, 2 heads, vocab 100; decoder_input_ids (N, 8) =
    start token + the targets shifted right, targets right-padded with -100. proj_out is
    tied to model.decoder.embed_tokens; the encoder's sinusoidal positions are frozen."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=SEQ["whisper"], max_target_positions=16,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    model = WhisperForConditionalGeneration(config).eval()
    L = SEQ["whisper"]

    def make_batch(N, gen):
        tokens, mask = _padded_text(N, L, gen)
        labels = tokens.masked_fill(mask == 0, -100)  # [N, L]
        dec = torch.cat([torch.full((N, 1), BOS), tokens[:, :-1]], 1)  # shift right
        return {
            "input_features": torch.randn(N, 8, 2 * SEQ["whisper"], generator=gen),
            "decoder_input_ids": dec,
            "targets": labels,
        }

    def per_row_loss(out, batch):
        return token_ce(out.logits, batch["targets"])

    return model, make_batch, per_row_loss


def whisper_classifier():
    """WhisperForAudioClassification (the encoder of :func:`whisper`'s config, a projector,
    mean pooling over the 8 positions, 3 labels) with ``use_weighted_layer_sum`` (a bare
    root parameter mixing the 3 hidden states) and the encoder's positional table
    trainable (frozen in the stock model; unfrozen by users who fine-tune it). The encoder
    reads that table as ``embed_positions(arange(8))``: an nn.Embedding called on a (T,)
    index vector with no batch dim, its (T, d) output broadcast over the rows, so with
    N == T nothing in the sizes tells positions from rows (issue 8)."""
    from transformers import WhisperConfig, WhisperForAudioClassification

    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=SEQ["whisper_cls"], classifier_proj_size=16,
        num_labels=3, use_weighted_layer_sum=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
    )
    model = WhisperForAudioClassification(config).eval()
    model.encoder.embed_positions.weight.requires_grad_(True)

    def make_batch(N, gen):
        return {
            "input_features": torch.randn(N, 8, 2 * SEQ["whisper_cls"], generator=gen),
            "targets": torch.randint(0, 3, (N,), generator=gen),
        }

    return model, make_batch, _class_loss


BUILDERS = {
    "gpt2": gpt2,
    "bert": bert,
    "vit": vit,
    "whisper": whisper,
    "gpt2_lora": gpt2_lora,
    "whisper_cls": whisper_classifier,
}
