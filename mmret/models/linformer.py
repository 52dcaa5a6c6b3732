"""A small Linformer text encoder (Wang et al. 2020, "Linformer: Self-Attention with Linear
Complexity"): keys and values are projected along the sequence from length n to k, so attention
costs O(n k) instead of O(n^2).

Written here rather than taken from PyPI: `linformer` 0.2.3 (2024) has no padding mask, and
`linformer-pytorch` 0.19.3 was last released in 2020. Captions of mixed length need the mask.

Padding: padded tokens are zeroed before the projection, so they add nothing to any projected key
or value, and a projected row built from padding alone (only possible when a row of E has no weight
on a real token, as with an identity E) is masked out of the softmax. The output at real tokens
therefore does not depend on the pad tokens or on how far the batch is padded, and with k = n and
E = F = I the layer is exactly standard masked multi-head attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmret.errors import MmretError


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 (timm `layers/mlp.py` naming)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class LinformerSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values are projected along the sequence to `k` rows.

    `in_proj` / `out_proj` are laid out as in `nn.MultiheadAttention` (packed q, k, v); `proj_e`
    and `proj_f` are the paper's E and F, shape (k, seq_len), shared by all heads.
    """

    def __init__(self, width: int, heads: int, seq_len: int, k: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise MmretError(f"the text width ({width}) must be divisible by the number of heads ({heads})")
        self.width, self.heads, self.seq_len, self.k = width, heads, seq_len, k
        self.dropout = dropout
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        # std 1/sqrt(n) keeps a projected key on the scale of a single key, whatever n is
        self.proj_e = nn.Parameter(torch.randn(k, seq_len) / math.sqrt(seq_len))
        self.proj_f = nn.Parameter(torch.randn(k, seq_len) / math.sqrt(seq_len))

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.width // self.heads).transpose(1, 2)  # (B, H, n, Dh)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, n, D), mask (B, n) bool, True at real tokens -> (B, n, D). Needs n <= seq_len."""
        b, n, _ = x.shape
        if n > self.seq_len:
            raise MmretError(f"a text of {n} tokens is longer than the encoder's maximum of "
                             f"{self.seq_len}; tokenize with max_length <= {self.seq_len}")
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        q, key, value = self.in_proj(x).chunk(3, dim=-1)  # (B, n, D) each
        keep = mask.unsqueeze(-1).to(key.dtype)  # (B, n, 1)
        e, f = self.proj_e[:, :n], self.proj_f[:, :n]  # (k, n): shorter batches use E's first columns
        key = torch.einsum("kn,bnd->bkd", e.to(key.dtype), key * keep)  # (B, k, D)
        value = torch.einsum("kn,bnd->bkd", f.to(value.dtype), value * keep)  # (B, k, D)
        live = torch.einsum("kn,bn->bk", (e.detach() != 0).float(), mask.float()) > 0  # (B, k); 0/1 exact in any dtype
        live = live | ~live.any(dim=-1, keepdim=True)  # an all-padding text attends uniformly, not NaN
        out = F.scaled_dot_product_attention(
            self._split_heads(q), self._split_heads(key), self._split_heads(value),
            attn_mask=live[:, None, None, :], dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, n, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.width))  # (B, n, D)


class LinformerBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, seq_len: int, k: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = LinformerSelfAttention(width, heads, seq_len, k, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), width, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))  # (B, n, D)
        return x + self.drop(self.mlp(self.norm2(x)))


class LinformerEncoder(nn.Module):
    """Token ids -> one vector per text: embeddings + learned positions, pre-LN Linformer blocks,
    a final LayerNorm and the mean over real tokens."""

    def __init__(self, vocab_size: int, max_length: int, width: int = 256, depth: int = 4, heads: int = 4,
                 k: int = 16, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.max_length, self.out_dim = max_length, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embedding = nn.Parameter(torch.randn(max_length, width) * 0.01)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [LinformerBlock(width, heads, max_length, k, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.apply(_init_weights)

    def token_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, n), attention_mask (B, n) with 1 at real tokens -> (B, n, D)."""
        n = input_ids.shape[1]
        if n > self.max_length:
            raise MmretError(f"a text of {n} tokens is longer than the encoder's maximum of "
                             f"{self.max_length}; tokenize with max_length <= {self.max_length}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.drop(self.token_embedding(input_ids) + self.pos_embedding[:n])  # (B, n, D)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, n) ids and mask -> (B, D): the mean of the final states over real tokens."""
        states = self.token_states(input_ids, attention_mask)  # (B, n, D)
        if attention_mask is None:
            return states.mean(dim=1)
        weights = attention_mask.to(states.dtype).unsqueeze(-1)  # (B, n, 1)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _init_weights(module: nn.Module) -> None:
    # small normal weights as in GPT-2 / nanoGPT; the E/F projections keep their own scale
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
