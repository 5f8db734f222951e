"""Rotary position embedding and attention, as FLUX.1 computes them.

RoPE rotates interleaved channel pairs (x[2j], x[2j+1]); the rotation runs in float32.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for positions along one axis.

    pos: (B, N) positions. Returns (B, N, dim // 2, 2, 2) float32 matrices [[cos, -sin], [sin, cos]]
    with angle pos * theta^(-2k / dim) for pair k. Frequencies are computed in pos's dtype.
    """
    if dim % 2:
        raise ValueError(f"RoPE axis dim must be even, got {dim}")
    omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=pos.dtype, device=pos.device) / dim))
    angles = pos[..., None] * omega  # (B, N, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rearrange(rot, "b n d (i j) -> b n d i j", i=2, j=2).float()


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q and k (B, H, L, D) by pe (B, 1, L, D // 2, 2, 2); adjacent channels form each pair."""
    cos, sin = pe[..., 0, 0], pe[..., 1, 0]  # (B, 1, L, D/2)

    def rotate(x: Tensor) -> Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, H, L, D/2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        out = torch.stack([cos * even - sin * odd, sin * even + cos * odd], dim=-1)
        return out.reshape(x.shape).type_as(x)

    return rotate(xq), rotate(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Full (unmasked) attention with RoPE. q, k, v: (B, H, L, D) -> (B, L, H * D)."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "b h l d -> b l (h d)")
