"""The querying bridge: a small BLIP-2 Q-Former over the frozen item tower's token states.

K learnable query vectors read the token states (B, T, in_dim) through L pre-LayerNorm blocks:
query self-attention, cross-attention to the tokens, MLP, each with a residual. The queries are
then normalised, averaged and projected to the shared space. Unlike BLIP-2 the queries do not
share weights with a text transformer: the text side here is a frozen encoder plus a head.

`ResidualBridge` is the bridge the `bridge` method builds: a projection head over the class (or
mean) token, exactly what the `heads` method learns, plus the queries' output as a correction
whose last projection starts at zero. At step 0 it is the heads model; the queries earn their
place only if the tokens hold something the pooled token lacks. Alone, a bridge must first
re-learn from 387 or 2,200 pairs what the pooled token already gives (it did not on Tux Paint).
Token dropout (a random share of the patch tokens hidden per picture in training, a cheap
augmentation that also cuts the cross-attention's work) and query dropout (whole queries left
out of the average) regularise the correction.

Parameters (w = width, h = mlp_ratio*w, K queries, L blocks, attention = 4w² + 4w):
queries K*w, input projection in_dim*w + w (only when in_dim != w), token norm 2w,
per block 2*(4w² + 4w) + 3*2w + (2wh + h + w), final norm 2w, projection w*out + out; with
positions, 2*64*w + w (a row's and a column's embedding for grids up to 64 a side, the prefix's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmret.errors import MmretError
from mmret.models.heads import InputNorm, Mlp, ProjectionHead, check_dims, check_dropout, init_input_norms

MAX_GRID = 64  # patches a side --bridge-positions covers (896 px at a patch of 14)


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


def patch_grid(num_tokens: int, option: str) -> tuple[int, int]:
    """(prefix, side) of ViT token states: the leading class (and register) tokens, then a square
    patch grid of side g; an error naming `option` when the tokens make no square grid."""
    for prefix in (1, 5, 0):  # class token; class + 4 registers; no prefix (CNN feature maps)
        g = math.isqrt(num_tokens - prefix)
        if g > 0 and g * g == num_tokens - prefix:
            return prefix, g
    raise MmretError(f"bridge: {option} needs a square patch grid, got {num_tokens} tokens")


def pool_patch_grid(tokens: Tensor, factor: int) -> Tensor:
    """Average-pool the square patch grid of ViT token states by `factor`, keeping the leading
    class (and register) tokens: (B, prefix + g*g, D) → (B, prefix + ceil(g/f)^2, D).

    The cross-attention's keys and values over every token are most of a bridge step's work;
    pooling 2x2 patches cuts them by about 4 while every query still sees the whole picture.
    """
    B, T, D = tokens.shape
    prefix, g = patch_grid(T, "--token-pool")
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
        token_drop: float = 0.0,
        query_drop: float = 0.0,
        zero_init: bool = False,
        positions: bool = False,
    ) -> None:
        super().__init__()
        check_dims("bridge", in_dim=in_dim, out_dim=out_dim, num_queries=num_queries,
                   depth=depth, width=width, heads=heads, token_pool=token_pool)
        for rate in (dropout, token_drop, query_drop):
            check_dropout("bridge", rate)
        if width % heads:
            raise MmretError(f"bridge: width {width} must be divisible by heads {heads}")
        if mlp_ratio <= 0 or int(width * mlp_ratio) < 1:
            raise MmretError(f"bridge: mlp_ratio must be positive, got {mlp_ratio}")
        self.in_dim, self.width, self.out_dim, self.token_pool = in_dim, width, out_dim, token_pool
        self.token_drop, self.query_drop = token_drop, query_drop
        # std 0.02 as BLIP-2 initialises its query tokens
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.input_proj = nn.Linear(in_dim, width) if in_dim != width else nn.Identity()
        self.token_norm = nn.LayerNorm(width)
        # a row's and a column's embedding added to each patch token (the class token gets its own):
        # attention is blind to the order of its keys, so place reaches the queries only through
        # what the states hold; these let a query ask for a place directly
        self.rows = self.cols = self.prefix_pos = None
        if positions:
            self.rows, self.cols = (nn.Parameter(torch.randn(MAX_GRID, width) * 0.02) for _ in range(2))
            self.prefix_pos = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(BridgeBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)
        if zero_init:  # the output is 0 until training moves it (a correction on top of another path)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.in_dim:
            raise MmretError(
                f"bridge expects token states (batch, tokens, {self.in_dim}), got {tuple(tokens.shape)}; "
                "cache the encoder's token states (not pooled features) for the bridge method"
            )
        if self.token_pool > 1:
            if mask is not None:
                raise MmretError("bridge: --token-pool pools a picture's patch grid; it does not apply to masked "
                                 "tokens")
            tokens = pool_patch_grid(tokens, self.token_pool)  # (B, T', in_dim)
        tokens = self.input_proj(tokens)  # (B, T', W)
        if self.rows is not None:
            tokens = tokens + self.position_embeddings(tokens.shape[1])
        if self.training and self.token_drop > 0 and mask is None:
            tokens = drop_tokens(tokens, self.token_drop)  # (B, T'', W)
        tokens = self.token_norm(tokens)  # (B, T, W)
        mask = None if mask is None else mask.to(torch.bool)
        x = self.queries.expand(tokens.shape[0], -1, -1)  # (B, Q, W)
        for block in self.blocks:
            x = block(x, tokens, mask)  # (B, Q, W)
        x = self.norm(x)
        if self.training and self.query_drop > 0:
            keep = torch.rand(x.shape[:2], device=x.device) >= self.query_drop  # (B, Q)
            keep[torch.arange(len(keep)), torch.randint(x.shape[1], (len(keep),), device=x.device)] = True
            pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)  # (B, W) mean of kept queries
        else:
            pooled = x.mean(dim=1)  # (B, W)
        return self.proj(pooled)  # (B, out_dim)


    def position_embeddings(self, num_tokens: int) -> Tensor:
        """(T, W): the prefix tokens' embedding, then row r's plus column c's for patch (r, c)."""
        prefix, g = patch_grid(num_tokens, "--bridge-positions")
        if g > MAX_GRID:
            raise MmretError(f"bridge: --bridge-positions covers grids up to {MAX_GRID}x{MAX_GRID} patches, "
                             f"got {g}x{g}")
        grid = (self.rows[:g, None, :] + self.cols[None, :g, :]).reshape(g * g, -1)  # (g*g, W), row-major
        return torch.cat([self.prefix_pos.expand(prefix, -1), grid])


def drop_tokens(tokens: Tensor, rate: float) -> Tensor:
    """Keep the first (class) token and a random (1 - rate) share of the others, per picture:
    (B, T, D) -> (B, 1 + ceil((T - 1) * (1 - rate)), D)."""
    B, T, D = tokens.shape
    keep = max(1, math.ceil((T - 1) * (1 - rate)))
    idx = torch.rand(B, T - 1, device=tokens.device).argsort(dim=1)[:, :keep] + 1  # (B, keep)
    rest = tokens.gather(1, idx[..., None].expand(-1, -1, D))  # (B, keep, D)
    return torch.cat([tokens[:, :1], rest], dim=1)


POOLS = ("cls", "mean", "cls+mean")


class PooledHead(nn.Module):
    """The pooled path of the bridge: token states (B, T, in_dim) -> (B, out_dim) through the heads
    method's item head over the class token (`pool="cls"`) or the mean of all tokens (`"mean"`).

    `"cls+mean"` also feeds the mean of the other (patch) tokens into the head's first layer
    through weights that start at zero: the head starts as the class-token head and learns how
    much of the patches' average to use. (A ridge map over class + mean patch token beats one over
    the class token alone by a third on openclipart.) Each input has its own `InputNorm`.
    """

    def __init__(self, head: ProjectionHead, pool: str = "cls", input_norm: bool = True) -> None:
        super().__init__()
        if pool not in POOLS:
            raise MmretError(f"bridge: the pooled path reads {', '.join(POOLS)}, got {pool!r}")
        self.pool_mode, self.head = pool, head
        self.norm = InputNorm(head.in_dim) if input_norm else nn.Identity()
        self.patch_norm = self.patch_in = None
        if pool == "cls+mean":
            first = head.hidden[0] if len(head.hidden) else head.proj
            self.patch_norm = InputNorm(head.in_dim) if input_norm else nn.Identity()
            with torch.random.fork_rng(devices=[]):  # zeros anyway: leave the generator to the heads after it
                self.patch_in = nn.Linear(head.in_dim, first.out_features, bias=False)
            nn.init.zeros_(self.patch_in.weight)

    def pool(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1) if self.pool_mode == "mean" else tokens[:, 0]  # (B, in_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.norm(self.pool(tokens))  # (B, in_dim)
        if self.patch_in is None:
            return self.head(x)  # (B, out_dim)
        extra = self.patch_in(self.patch_norm(tokens[:, 1:].mean(dim=1)))  # (B, first layer's width)
        if not len(self.head.hidden):
            return self.head.proj(x) + extra
        return self.head.proj(self.head.hidden[1:](self.head.hidden[0](x) + extra))  # (B, out_dim)

    def init_input_norms(self, sample: Tensor) -> int:
        norms = [(self.norm, self.pool(sample)), (self.patch_norm, sample[:, 1:].mean(dim=1))]
        for norm, x in norms:
            if isinstance(norm, InputNorm):
                norm.init_from(x)
        return sum(isinstance(n, InputNorm) for n, _ in norms)


class ResidualBridge(nn.Module):
    """Token states (B, T, in_dim) -> pooled(tokens) + correction(tokens), (B, out_dim).

    `pooled` is a `PooledHead`, built as the heads method builds its item head; `correction` is a
    `QueryBridge` (with its input norm) whose output starts at zero, or None (the pooled path
    alone). `init_input_norms` starts the pooled path's norms from the pooled tokens of the sample
    and the correction's from all of them, so at step 0 this tower computes what the heads
    method's item head does on the pooled feature.
    """

    def __init__(self, pooled: PooledHead, correction: nn.Module | None = None) -> None:
        super().__init__()
        self.pooled, self.correction = pooled, correction

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        if tokens.dim() != 3:
            raise MmretError(f"bridge expects token states (batch, tokens, width), got {tuple(tokens.shape)}; "
                             "cache the encoder's token states (not pooled features) for the bridge method")
        if mask is not None:
            raise MmretError("bridge: the pooled path reads a picture's class token; masked token states are not "
                             "supported")
        out = self.pooled(tokens)  # (B, out_dim)
        return out if self.correction is None else out + self.correction(tokens)

    def init_input_norms(self, sample: Tensor) -> int:
        """Start the input norms from a sample of training token states (N, T, in_dim)."""
        n = self.pooled.init_input_norms(sample)
        return n if self.correction is None else n + init_input_norms(self.correction, sample)

    def named_parts(self) -> dict[str, nn.Module]:
        parts = {"pooled head": self.pooled}
        return parts if self.correction is None else parts | {"queries": self.correction}
