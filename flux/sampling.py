"""Rectified-flow sampling as FLUX.1 runs it: prepare -> get_schedule -> denoise -> unpack.

Flow convention: t = 1 is pure noise, t = 0 is data, x_t = (1 - t) * x0 + t * noise, and the model predicts
the velocity v = noise - x0. An Euler step from t_curr to t_prev is x + (t_prev - t_curr) * v.
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

from flux.model import Flux


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Latent (h, w) for an image: 1/8 of the pixels, rounded up to an even number (the 2x2 patches)."""
    return 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)


def image_tokens(height: int, width: int) -> int:
    """L, the number of image tokens (2x2 latent patches) for an image of `height` x `width` pixels."""
    h, w = latent_size(height, width)
    return (h // 2) * (w // 2)


def get_noise(
    num_samples: int, height: int, width: int, device: torch.device | str, dtype: torch.dtype, seed: int
) -> Tensor:
    """Gaussian latent noise (B, 16, h, w), drawn on a seeded CPU generator: a seed is device-independent."""
    h, w = latent_size(height, width)
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(num_samples, 16, h, w, dtype=dtype, generator=generator).to(device)


def pack(x: Tensor) -> Tensor:
    """Latent (B, C, h, w) -> tokens (B, h/2 * w/2, C * 4), row-major over 2x2 patches."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Tokens (B, L, C * 4) -> latent (B, C, h, w) for an image of height x width pixels."""
    h, w = latent_size(height, width)
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)


def img_ids_for(batch: int, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids (B, h/2 * w/2, 3) of the latent tokens: (0, row, column) for each 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch)


def prepare(img: Tensor, txt: Tensor, vec: Tensor) -> dict[str, Tensor]:
    """Pack a noise latent and pair it with text embeddings into the model's inputs.

    img (B or 1, 16, h, w); txt (B or 1, T, 4096) T5 tokens; vec (B or 1, 768) CLIP pooled. A batch of 1 is
    repeated to match the other side (one noise for several prompts, or one prompt for several noises).
    Text ids are zero. Unlike the reference, the encoders run outside (see `flux.conditioner`).
    """
    bs = max(img.shape[0], txt.shape[0])
    if img.shape[0] == 1 and bs > 1:
        img = repeat(img, "1 ... -> b ...", b=bs)
    if txt.shape[0] == 1 and bs > 1:
        txt, vec = repeat(txt, "1 ... -> b ...", b=bs), repeat(vec, "1 ... -> b ...", b=bs)
    _, _, h, w = img.shape
    return {
        "img": pack(img),
        "img_ids": img_ids_for(bs, h, w, device=img.device),
        "txt": txt.to(img.device),
        "txt_ids": torch.zeros(bs, txt.shape[1], 3, device=img.device),
        "vec": vec.to(img.device),
    }


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable:
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """num_steps + 1 times from 1 to 0; with shift, resolution-dependent warping toward high noise."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


@dataclass
class StepInfo:
    """What the sampler knows at one step; passed to the per-step callback."""

    index: int  # step number, from 0
    t_curr: float
    t_prev: float
    img: Tensor  # the latent tokens fed to the model at this step (B, L, 64)
    pred: Tensor | None = None  # the velocity, set after the model call


StepCallback = Callable[[StepInfo], None]


def denoise(
    model: Flux,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: list[float],
    guidance: float = 4.0,
    before_step: StepCallback | None = None,
    after_step: StepCallback | None = None,
    progress: Callable | None = None,
) -> Tensor:
    """Euler integration of the flow from timesteps[0] to timesteps[-1], in img's dtype.

    `before_step` runs before each model call, `after_step` after it with `pred` set; `progress` wraps the
    step iterator (e.g. tqdm). Timesteps and guidance are cast to img's dtype, as in the reference.
    """
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    pairs = list(itertools.pairwise(timesteps))
    steps = progress(pairs) if progress is not None else pairs
    for index, (t_curr, t_prev) in enumerate(steps):
        info = StepInfo(index=index, t_curr=t_curr, t_prev=t_prev, img=img)
        if before_step is not None:
            before_step(info)
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        pred = model(
            img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec, guidance=guidance_vec
        )
        info.pred = pred
        if after_step is not None:
            after_step(info)
        img = img + (t_prev - t_curr) * pred
    return img
