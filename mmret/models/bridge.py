"""The querying bridge: a small BLIP-2 Q-Former over the frozen image encoder's token states.

K learnable query vectors read the token states (B, T, in_dim) through L pre-LayerNorm blocks:
query self-attention, cross-attention to the tokens, MLP, each with a residual. The queries are
then normalised, averaged and projected to the shared space. Unlike BLIP-2 the queries do not
share weights with a text transformer: the text side here is a frozen encoder plus a head.

Parameters (w = width, h = mlp_ratio*w, K queries, L blocks, attention = 4w² + 4w):
queries K*w, input projection in_dim*w + w (only when in_dim != w), token norm 2w,
per block 2*(4w² + 4w) + 3*2w + (2wh + h + w), final norm 2w, projection w*out + out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmret.errors import MmretError
from mmret.models.heads import Mlp, check_dims, check_dropout


class Attention(nn.Module):
    """Multi-head attention of queries x over keys/values `context` (x itself for self-attention)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def _split(self, x: Tensor) -> Tensor:
        B, N, W = x.shape
        return x.view(B, N, self.heads, W // self.heads).transpose(1, 2)  # (B, heads, N, W/heads)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        B, Q, W = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context))
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T), True = attend
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, heads, Q, W/heads)
        return self.proj(out.transpose(1, 2).reshape(B, Q, W))  # (B, Q, W)


class BridgeBlock(nn.Module):
    """Pre-LN block: queries attend to each other, then to the tokens, then pass an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads, dropout)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), width, dropout)

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)  # (B, Q, W)
        x = x + self.cross_attn(self.norm2(x), tokens, mask)  # (B, Q, W)
        return x + self.mlp(self.norm3(x))  # (B, Q, W)


def pool_patch_grid(tokens: Tensor, factor: int) -> Tensor:
    """Average-pool the square patch grid of ViT token states by `factor`, keeping the leading
    class (and register) tokens: (B, prefix + g*g, D) → (B, prefix + ceil(g/f)^2, D).

    The cross-attention's keys and values over every token are most of a bridge step's work;
    pooling 2x2 patches cuts them by about 4 while every query still sees the whole picture.
    """
    B, T, D = tokens.shape
    for prefix in (1, 5, 0):  # class token; class + 4 registers; no prefix (CNN feature maps)
        g = math.isqrt(T - prefix)
        if g > 0 and g * g == T - prefix:
            break
    else:
        raise MmretError(f"bridge: --token-pool needs a square patch grid, got {T} tokens")
    grid = tokens[:, prefix:].transpose(1, 2).reshape(B, D, g, g)  # (B, D, g, g)
    pooled = F.avg_pool2d(grid, factor, ceil_mode=True).flatten(2).transpose(1, 2)  # (B, g'*g', D)
    return torch.cat([tokens[:, :prefix], pooled], dim=1)


class QueryBridge(nn.Module):
    """Token states (B, T, in_dim) [+ mask (B, T), True/1 = real token] → (B, out_dim)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 512,
        num_queries: int = 32,
        depth: int = 2,
        width: int = 384,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        token_pool: int = 1,
    ) -> None:
        super().__init__()
        check_dims("bridge", in_dim=in_dim, out_dim=out_dim, num_queries=num_queries,
                   depth=depth, width=width, heads=heads, token_pool=token_pool)
        check_dropout("bridge", dropout)
        if width % heads:
            raise MmretError(f"bridge: width {width} must be divisible by heads {heads}")
        if mlp_ratio <= 0 or int(width * mlp_ratio) < 1:
            raise MmretError(f"bridge: mlp_ratio must be positive, got {mlp_ratio}")
        self.in_dim, self.width, self.out_dim, self.token_pool = in_dim, width, out_dim, token_pool
        # std 0.02 as BLIP-2 initialises its query tokens
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.input_proj = nn.Linear(in_dim, width) if in_dim != width else nn.Identity()
        self.token_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(BridgeBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.in_dim:
            raise MmretError(
                f"bridge expects token states (batch, tokens, {self.in_dim}), got {tuple(tokens.shape)}; "
                "cache the encoder's token states (not pooled features) for the bridge method"
            )
        if self.token_pool > 1:
            if mask is not None:
                raise MmretError("bridge: --token-pool pools a picture's patch grid; it does not apply to masked tokens")
            tokens = pool_patch_grid(tokens, self.token_pool)  # (B, T', in_dim)
        tokens = self.token_norm(self.input_proj(tokens))  # (B, T, W)
        mask = None if mask is None else mask.to(torch.bool)
        x = self.queries.expand(tokens.shape[0], -1, -1)  # (B, Q, W)
        for block in self.blocks:
            x = block(x, tokens, mask)  # (B, Q, W)
        return self.proj(self.norm(x).mean(dim=1))  # (B, out_dim)
