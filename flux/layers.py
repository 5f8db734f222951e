"""The building blocks of the FLUX.1 flow transformer.

Attribute names are the checkpoint's key names (`img_attn.qkv`, `img_mlp.0`, `adaLN_modulation.1`), so a
published state dict loads without any renaming.
"""

import functools
import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from flux.math import attention, rope


@functools.lru_cache(maxsize=16)
def _frequencies(half: int, max_period: int, device: torch.device) -> Tensor:
    """exp(-ln(max_period) * i / half) for i < half, computed on the CPU and moved once per device: a
    copy to the GPU at every call would wait for the GPU to finish its queue (twice per step). Made outside
    inference mode, so that the cached tensor also serves code that records gradients."""
    with torch.inference_mode(False):
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t (B,) -> (B, dim), cosines first.

    The x1000 happens in t's own dtype (bf16 in the sampler, so 1000 * t is rounded there); the frequencies
    and the trigonometry run in float32, and the result is cast back to t's dtype. The frequencies are
    computed on the CPU and then moved, as the reference does: a GPU's exp may differ from the CPU's in the
    last bit, which can flip a bf16 value of the embedding.
    """
    t = time_factor * t
    half = dim // 2
    freqs = _frequencies(half, max_period, t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


class EmbedND(nn.Module):
    """RoPE over several position axes; ids (B, N, n_axes) -> pe (B, 1, N, sum(axes_dim) // 2, 2, 2)."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        per_axis = [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(per_axis, dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, cast back, then scaled."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_f = x.float()
        rrms = torch.rsqrt(torch.mean(x_f**2, dim=-1, keepdim=True) + 1e-6)
        return (x_f * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds one stream's qkv, QK-norm and output projection; the blocks call these parts directly."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> normalised q, k and v, each (B, H, L, D / H)."""
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class AttentionProbe(nn.Module):
    """A hook site, called with a block's attention inputs: q and k (B, H, T + L, D / H) after QK-norm and
    before RoPE, and pe. It does nothing itself; `flux.attention` hooks it to measure where tokens look. It
    holds no parameters, so the checkpoint's keys are unchanged."""

    def forward(self, q: Tensor, k: Tensor, pe: Tensor) -> None:
        return None


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """vec (B, D) -> one (double: two) (shift, scale, gate) triples, each (B, 1, D)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _mlp(hidden_size: int, mlp_hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
    )


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [txt; img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.attn_probe = AttentionProbe()

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """img (B, L, D), txt (B, T, D), vec (B, D), pe over the T + L tokens -> updated (img, txt)."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_mod1.modulate(self.txt_norm1(txt)))

        # Text tokens come first in the joint sequence, matching the order of pe.
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        self.attn_probe(q, k, pe)
        attn = attention(q, k, v, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.modulate(self.img_norm2(img)))

        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One set of weights over the joint [txt; img] sequence; attention and MLP run in parallel."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        # qkv and the MLP's first layer share one matmul; attention output and MLP share the second.
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.hidden_size = hidden_size
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)
        self.attn_probe = AttentionProbe()

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        """x (B, T + L, D), text tokens first -> same shape."""
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(mod.modulate(self.pre_norm(x))), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        self.attn_probe(q, k, pe)
        attn = attention(q, k, v, pe=pe)
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))
        return x + mod.gate * out


class LastLayer(nn.Module):
    """Adaptive LayerNorm then a linear map from hidden tokens to packed latent patches (the velocity)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """x (B, L, D), vec (B, D) -> (B, L, patch * patch * out_channels)."""
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # shift first, unlike diffusers
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)
