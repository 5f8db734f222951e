"""Named model specs: architecture, where the weights live, and the sampling defaults of each model."""

from dataclasses import dataclass, replace

from flux.autoencoder import AutoEncoderParams
from flux.model import FluxParams

# T5 and CLIP come from the ungated schnell repo for every model: bf16 safetensors, about 10 GB.
TEXT_ENCODER_REPO = "black-forest-labs/FLUX.1-schnell"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params: FluxParams
    ae_params: AutoEncoderParams
    repo_id: str  # hub repo holding the flow and AE files
    repo_flow: str  # file name of the flow transformer weights
    repo_ae: str  # file name of the autoencoder weights
    text_repo_id: str  # hub repo holding text_encoder(_2)/ and tokenizer(_2)/
    t5_max_length: int  # T5 tokens per prompt
    default_steps: int
    default_guidance: float  # ignored by models without guidance_embed
    shift_schedule: bool  # resolution-dependent schedule shift
    gated: bool  # the hub repo needs a licence accepted and a token
    license: str
    clip_max_length: int = 77

    @property
    def uses_guidance(self) -> bool:
        return self.params.guidance_embed


def _full_size_params(guidance_embed: bool) -> FluxParams:
    return FluxParams(
        in_channels=64,
        out_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=[16, 56, 56],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )


FULL_AE_PARAMS = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)

# flux-tiny: the same architecture at toy width, for tests and for trying the pipeline without a GPU.
# Its weights are generated from a seed by `flux.tiny`, never downloaded.
TINY_PARAMS = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=3,
    axes_dim=[4, 14, 14],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)

TINY_AE_PARAMS = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=32,
    out_ch=3,
    ch_mult=[1, 1, 2, 2],  # three 2x resamplings: the real 8x
    num_res_blocks=1,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)

FLUX_DEV = ModelSpec(
    name="flux-dev",
    params=_full_size_params(guidance_embed=True),
    ae_params=FULL_AE_PARAMS,
    repo_id="black-forest-labs/FLUX.1-dev",
    repo_flow="flux1-dev.safetensors",
    repo_ae="ae.safetensors",
    text_repo_id=TEXT_ENCODER_REPO,
    t5_max_length=512,
    default_steps=50,
    default_guidance=2.5,
    shift_schedule=True,
    gated=True,
    license="FLUX.1 [dev] Non-Commercial License",
)

CONFIGS: dict[str, ModelSpec] = {
    "flux-schnell": ModelSpec(
        name="flux-schnell",
        params=_full_size_params(guidance_embed=False),
        ae_params=FULL_AE_PARAMS,
        repo_id="black-forest-labs/FLUX.1-schnell",
        repo_flow="flux1-schnell.safetensors",
        repo_ae="ae.safetensors",
        text_repo_id=TEXT_ENCODER_REPO,
        t5_max_length=256,
        default_steps=4,
        default_guidance=2.5,
        shift_schedule=False,
        gated=False,
        license="Apache-2.0",
    ),
    "flux-dev": FLUX_DEV,
    # Krea is a drop-in replacement for dev: the same architecture and defaults, other weights.
    "flux-dev-krea": replace(
        FLUX_DEV,
        name="flux-dev-krea",
        repo_id="black-forest-labs/FLUX.1-Krea-dev",
        repo_flow="flux1-krea-dev.safetensors",
    ),
    "flux-tiny": ModelSpec(
        name="flux-tiny",
        params=TINY_PARAMS,
        ae_params=TINY_AE_PARAMS,
        repo_id="flux-intermediate-representation/flux-tiny",  # never online; see flux.tiny
        repo_flow="flux1-tiny.safetensors",
        repo_ae="ae.safetensors",
        text_repo_id="flux-intermediate-representation/flux-tiny",
        t5_max_length=32,
        default_steps=4,
        default_guidance=3.5,
        shift_schedule=True,
        gated=False,
        license="Apache-2.0",
    ),
}


def get_spec(name: str) -> ModelSpec:
    """The spec for a model name; a ValueError listing the choices otherwise."""
    if name not in CONFIGS:
        raise ValueError(f"Unknown model {name!r}. Choose one of: {', '.join(CONFIGS)}.")
    return CONFIGS[name]
