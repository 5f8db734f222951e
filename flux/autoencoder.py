"""The FLUX.1 VAE: 8x spatial compression to 16 latent channels, no quant convs.

`encode` returns the scaled distribution mean; `decode` undoes the scale and shift before the decoder.
"""

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn


@dataclass
class AutoEncoderParams:
    resolution: int  # nominal training resolution (informational)
    in_channels: int  # image channels
    ch: int  # base channel count; level i has ch * ch_mult[i]
    out_ch: int  # decoded image channels
    ch_mult: list[int]  # channel multiplier per resolution level; len - 1 = number of 2x resamplings
    num_res_blocks: int  # resnets per encoder level (the decoder has one more)
    z_channels: int  # latent channels
    scale_factor: float  # latent = scale_factor * (mean - shift_factor)
    shift_factor: float


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _swish_(x: Tensor) -> Tensor:
    """swish of a tensor nothing else holds (a norm's fresh output), in place where no gradient is recorded:
    the same values, one activation-sized buffer fewer at the decoder's widest layers (at 4096 px each
    float32 copy of the top level's activations is 8.6 GB)."""
    return swish(x) if torch.is_grad_enabled() else x.mul_(torch.sigmoid(x))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H * W positions, with 1x1 convolutions as projections."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        height, width = h.shape[-2:]
        # Contiguous, or SDPA's fused kernels refuse the strided view and the math fallback materialises
        # the (HW x HW) scores, twice at its peak: 2 x 17 GB in float32 for one 2048 px image (HW = 256²).
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c").contiguous() for f in (self.q, self.k, self.v))
        h = nn.functional.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish_(self.norm1(x)))
        h = self.conv2(_swish_(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric zero pad (right and bottom only) before the stride-2 conv.
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.num_resolutions = len(p.ch_mult)
        self.num_res_blocks = p.num_res_blocks
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *p.ch_mult)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level in range(self.num_resolutions):
            block_in = p.ch * in_mult[level]
            block_out = p.ch * p.ch_mult[level]
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down.attn = nn.ModuleList()
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) -> mean and log-variance (B, 2 * z_channels, H / 8, W / 8)."""
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish_(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.num_resolutions = len(p.ch_mult)
        self.num_res_blocks = p.num_res_blocks
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        # Built from the lowest resolution up, but stored so that up[i] is resolution level i.
        up_levels = []
        for level in reversed(range(self.num_resolutions)):
            block_out = p.ch * p.ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up.attn = nn.ModuleList()
            if level != 0:
                up.upsample = Upsample(block_in)
            up_levels.insert(0, up)
        self.up = nn.ModuleList(up_levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Unscaled latent (B, z_channels, h, w) -> image (B, out_ch, 8h, 8w), roughly in [-1, 1]."""
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        h = h.to(next(self.up.parameters()).dtype)  # the mid block may run in another dtype
        for level in reversed(range(self.num_resolutions)):
            for block in self.up[level].block:
                h = block(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(_swish_(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def encode(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> scaled latent (B, z_channels, H / 8, W / 8), the mean."""
        mean, _logvar = torch.chunk(self.encoder(x), 2, dim=1)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (B, z_channels, h, w) -> image (B, 3, 8h, 8w)."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
