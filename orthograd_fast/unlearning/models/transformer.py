"""``ClassTokenTransformer``: the shape of a ViT on pre-embedded patches (not registered:
its inputs are (N, T, feat) features, not the image data sets' (N, C, H, W))."""
from __future__ import annotations

import torch
from torch import nn


class ClassTokenTransformer(nn.Module):
    """(N, T, feat) features -> (N, num_classes): a linear token embedding, a class token and
    a positional embedding as bare parameters, ``layers`` nn.TransformerEncoderLayer blocks
    (nn.MultiheadAttention inside), LayerNorm, and a linear head on the class token.

    The SampleGram zoo and benchmark use it because its bare parameters and attention
    projections need the traced rules.
    """

    def __init__(self, feat: int, num_classes: int, *, d: int = 128, heads: int = 4, ff: int = 256,
                 seq_len: int = 64, layers: int = 2, init_scale: float = 0.02):
        super().__init__()
        self.embed = nn.Linear(feat, d)
        self.cls = nn.Parameter(init_scale * torch.randn(1, 1, d))
        self.pos = nn.Parameter(init_scale * torch.randn(1, seq_len + 1, d))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h[:, 0]))
