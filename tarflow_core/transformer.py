"""A pre-norm causal transformer: the conditioner of every flow and the AR baseline's body."""

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of every layer for the positions seen so far, for one decoding call.

    Buffers are allocated once for `max_len` positions, so appending a position copies only
    that position; `length` is how many are filled. A new cache is made for every sampling call,
    so nothing from one call leaks into the next.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device=None,
    ):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, heads, T_new, head_dim) after the filled part of one layer; return
        that layer's keys and values so far. The caller advances `length` after every layer."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"decoding past {self.max_len} positions")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        B, T, W = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, W // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, W / heads)
        dropout = self.dropout if self.training else 0.0

        if cache is None or cache.length == 0:
            if cache is not None:
                cache.append(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            # The T new queries sit at positions past..past+T-1 of the cached keys. torch's
            # is_causal aligns the mask to the top-left corner, which is right only when queries
            # and keys have the same length; here query i may see keys 0..past+i.
            past = cache.length
            k, v = cache.append(layer, k, v)
            mask = None
            if T > 1:
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device)
                mask = mask.tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, W))


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


def check_sizes(width: int, num_heads: int, mlp_ratio: int) -> None:
    """Refuse sizes no transformer can have, before any layer is built from them."""
    if width < 1 or num_heads < 1 or mlp_ratio < 1:
        raise ValueError(
            f"a transformer needs width >= 1, num_heads >= 1 and mlp_ratio >= 1, not width "
            f"{width}, num_heads {num_heads}, mlp_ratio {mlp_ratio}"
        )


class CausalTransformer(nn.Module):
    """Learned positions, `num_layers` pre-norm blocks and a final norm: (B, T, W) -> (B, T, W)."""

    def __init__(
        self,
        width: int,
        num_layers: int,
        num_heads: int,
        max_len: int,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        check_sizes(width, num_heads, mlp_ratio)
        super().__init__()
        self.max_len = max_len
        self.num_heads = num_heads
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(width)

    def new_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty cache for decoding up to `max_len` positions of a batch."""
        width = self.position.shape[1]
        return KVCache(
            len(self.blocks),
            batch,
            self.num_heads,
            self.max_len,
            width // self.num_heads,
            dtype or self.position.dtype,
            device or self.position.device,
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Every position of x, or with a cache, the positions that follow the cached ones."""
        past = 0 if cache is None else cache.length
        T = x.shape[1]
        if past + T > self.max_len:
            raise ValueError(f"sequence of {past + T} positions exceeds max_len {self.max_len}")

        x = x + self.position[past : past + T]
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return self.norm(x)
