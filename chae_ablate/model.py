"""CHAE: a CNN trunk whose feature map becomes tokens for a small pre-norm transformer.

`build_model(ModelConfig(), 11)` is the paper's baseline: 402,417 parameters, 257 tokens at 256 px.
Every ablation axis is a ModelConfig field, so `forward` stays a straight line.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ACTIVATIONS, POOLS, ConvConfig, ModelConfig, TransformerConfig


def conv_trunk(conv: ConvConfig, act: type[nn.Module]) -> nn.Sequential:
    """Pre-norm stages: [BatchNorm -> Conv -> act] x layers -> pool -> spatial dropout."""
    layers: list[nn.Module] = []
    in_ch = 3
    for stage in conv.stages:
        for _ in range(stage.layers):
            layers += [nn.BatchNorm2d(in_ch),
                       nn.Conv2d(in_ch, stage.channels, stage.kernel, padding=stage.kernel // 2),
                       act()]
            in_ch = stage.channels
        if POOLS[stage.pool] is not None:
            layers.append(POOLS[stage.pool](2))
        if conv.spatial_dropout:
            layers.append(nn.Dropout2d(conv.spatial_dropout))
    if POOLS[conv.extra_pool] is not None:
        layers.append(POOLS[conv.extra_pool](conv.extra_pool_size))
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """Multi-head self-attention, head dim = dim / heads, fused via scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, h, T, d) -> (B, T, D)


def mlp(dim: int, hidden: tuple[int, ...], act: type[nn.Module], dropout: float) -> nn.Sequential:
    """dim -> hidden... -> dim, each Linear followed by act and dropout (as in the Keras ViT)."""
    layers: list[nn.Module] = []
    sizes = (dim, *hidden, dim)
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(n_in, n_out), act(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class EncoderLayer(nn.Module):
    """Pre-norm: x + MHA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, cfg: TransformerConfig, act: type[nn.Module]):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.attn_dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = mlp(cfg.dim, cfg.mlp_hidden, act, cfg.mlp_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CHAE(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        dim, conv_width = cfg.transformer.dim, cfg.conv.stages[-1].channels
        self.trunk = conv_trunk(cfg.conv, act)
        self.project = nn.Linear(conv_width, dim) if dim != conv_width else nn.Identity()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, cfg.tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.encoder = nn.Sequential(*[EncoderLayer(cfg.transformer, act) for _ in range(cfg.transformer.depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.trunk(images)  # (B, 3, R, R) -> (B, C, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, C, G, G) -> (B, G*G, C), row-major tokens
        x = self.project(x)  # (B, G*G, C) -> (B, G*G, D)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos  # (B, G*G+1, D)
        x = self.encoder(x)
        return self.head(self.norm(x[:, 0]))  # CLS token -> (B, num_classes)


def build_model(config: ModelConfig, num_classes: int) -> CHAE:
    """The CHAE network for a validated config."""
    return CHAE(config, num_classes)
