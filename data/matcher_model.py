"""The torch twin of indexer.models.matcher's numpy forward pass (same parameter names), trained by
data/train_matcher.py; tests/test_rerank.py holds the two to the same logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from indexer.models.matcher import MatcherConfig, clause_ids, position_table

MLP_RATIO = 2


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, context, key_mask=None, rows=None, key_position=None):
        # rows: which context row each of x's rows reads (keys and values projected once per picture);
        # key_position: added to every picture's keys, so that where a patch is weighs in its own right
        b, t, w = x.shape
        h = self.heads

        def split(y):
            return y.reshape(y.shape[0], -1, h, w // h).transpose(1, 2)

        k = self.k(context) if key_position is None else self.k(context) + key_position
        q, k, v = split(self.q(x)), split(k), split(self.v(context))
        if rows is not None:
            k, v = k[rows], v[rows]
        logits = q @ k.transpose(-1, -2) / math.sqrt(w // h)
        if key_mask is not None:  # padding tokens are never attended to
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, w)
        return self.o(out)


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(width, MLP_RATIO * width), nn.Linear(MLP_RATIO * width, width)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class ImageBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = (
            nn.LayerNorm(width),
            Attention(width, heads),
            nn.LayerNorm(width),
            Mlp(width),
        )

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y)
        return x + self.mlp(self.ln2(x))


class FusionBlock(nn.Module):
    def __init__(self, width: int, heads: int, grid: int):
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln2, self.cross_attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln3, self.mlp = nn.LayerNorm(width), Mlp(width)
        # the patches' own key positions, from the 2-D sine-cosine table: a clause's words that
        # name a place ask for patches there directly, not through what the image layers kept of it
        self.cross_pos = nn.Parameter(torch.from_numpy(position_table(grid, width)))

    def forward(self, x, mask, patches, rows):
        y = self.ln1(x)
        x = x + self.self_attn(y, y, mask)
        x = x + self.cross_attn(self.ln2(x), patches, rows=rows, key_position=self.cross_pos)
        return x + self.mlp(self.ln3(x))


class Matcher(nn.Module):
    def __init__(self, config: MatcherConfig):
        super().__init__()
        w, patch, grid = config.width, config.patch_size, config.image_size // config.patch_size
        self.config = config
        self.patch_embed = nn.Linear(3 * patch * patch, w)
        self.image_pos = nn.Parameter(torch.randn(grid * grid, w) * 0.02)
        self.register_buffer("fixed_pos", torch.from_numpy(position_table(grid, w)), persistent=False)
        self.image_blocks = nn.ModuleList(ImageBlock(w, config.heads) for _ in range(config.image_layers))
        self.image_ln = nn.LayerNorm(w)
        self.token_embed = nn.Embedding(len(config.tokens) + 2, w)
        self.text_pos = nn.Parameter(torch.randn(config.context_length, w) * 0.02)
        self.clause_embed = nn.Embedding(config.clauses, w)
        self.fusion_blocks = nn.ModuleList(FusionBlock(w, config.heads, grid) for _ in range(config.fusion_layers))
        self.final_ln = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)

    def encode_image(self, pixels):  # (B, 3, S, S) → (B, patches, width)
        p = self.config.patch_size
        b, c, s, _ = pixels.shape
        patches = pixels.reshape(b, c, s // p, p, s // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (s // p) ** 2, -1)
        x = self.patch_embed(patches) + self.image_pos + self.fixed_pos
        for block in self.image_blocks:
            x = block(x)
        return self.image_ln(x)

    def forward(self, patches, tokens, rows):
        # patches (pictures, P, W); tokens (pairs, T) mapped ids, 0 = padding; rows (pairs,): each
        # pair's picture → (pairs,) logits
        mask = tokens != 0
        x = self.token_embed(tokens) + self.text_pos[: tokens.shape[1]]
        x = x + self.clause_embed(torch.from_numpy(clause_ids(self.config, tokens.numpy())))
        for block in self.fusion_blocks:
            x = block(x, mask, patches, rows)
        return self.head(self.final_ln(x[:, 0]))[:, 0]
