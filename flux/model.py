"""The FLUX.1 flow transformer: 19 double-stream blocks, then 38 single-stream blocks, then a final layer."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flux.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass
class FluxParams:
    in_channels: int  # packed latent channels per token: 16 latent channels x 2 x 2 patch
    out_channels: int  # channels of the predicted velocity per token
    vec_in_dim: int  # size of the CLIP pooled embedding
    context_in_dim: int  # size of a T5 token embedding
    hidden_size: int  # model width D
    mlp_ratio: float  # MLP width / D
    num_heads: int  # attention heads; D / num_heads must equal sum(axes_dim)
    depth: int  # number of double-stream blocks
    depth_single_blocks: int  # number of single-stream blocks
    axes_dim: list[int]  # RoPE channels per position axis (unused, row, column)
    theta: int  # RoPE base
    qkv_bias: bool  # bias on the qkv projections
    guidance_embed: bool  # distilled guidance input (dev, Krea); schnell has none


class Flux(nn.Module):
    """Velocity prediction v(x_t, t) for packed latent tokens, conditioned on T5 tokens and a CLIP vector."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(
                f"hidden_size {params.hidden_size} is not divisible by num_heads {params.num_heads}"
            )
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"sum(axes_dim) = {sum(params.axes_dim)} must equal the head dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        # Identity holds no parameters, so schnell's state dict has no guidance_in keys.
        self.guidance_in = (
            MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, qkv_bias=params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """The modulation vector vec (B, D) from timesteps (B,), CLIP pooled y, guidance (B,)."""
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("This model embeds guidance (dev/Krea): pass a guidance value.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        return vec + self.vector_in(y)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """img (B, L, in_channels), txt (B, T, context_in_dim), ids (B, *, 3) -> velocity (B, L, out)."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, N, C); got {tuple(img.shape)} and {tuple(txt.shape)}")
        vec = self.conditioning(timesteps, y, guidance)
        img = self.img_in(img)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        # Keyword calls, as in the reference, so forward hooks registered with_kwargs see named inputs.
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe)
        return self.final_layer(x[:, txt.shape[1] :, ...], vec)
