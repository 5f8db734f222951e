"""State-dict keys and shapes against the checkpoint layout of flux_reference.md section 2.

The expected tables are generated here from the documented per-block suffix tables, not read off our modules,
so a renamed attribute, a missing parameter or a transposed weight fails before any real checkpoint is loaded.
Models are built on the meta device: the full-size configs cost no memory.
"""

import re

import pytest
import torch
from safetensors import safe_open

from flux.autoencoder import AutoEncoder, AutoEncoderParams
from flux.configs import CONFIGS
from flux.model import Flux, FluxParams

REAL = ["flux-schnell", "flux-dev", "flux-dev-krea"]

# Section 1.3: the values every full-size config shares.
FULL = dict(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
)
FULL_AE = dict(in_channels=3, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=16)

Shapes = dict[str, tuple[int, ...]]


def _linear(shapes: Shapes, name: str, out_dim: int, in_dim: int) -> None:
    shapes[f"{name}.weight"] = (out_dim, in_dim)
    shapes[f"{name}.bias"] = (out_dim,)


def expected_flux_shapes(
    in_channels: int,
    out_channels: int,
    vec_in_dim: int,
    context_in_dim: int,
    hidden_size: int,
    mlp_ratio: float,
    num_heads: int,
    depth: int,
    depth_single_blocks: int,
    guidance_embed: bool,
) -> Shapes:
    """Section 2.1 in registration order: img_in, time_in, vector_in, [guidance_in], txt_in, blocks, final."""
    d, hd, mlp = hidden_size, hidden_size // num_heads, int(hidden_size * mlp_ratio)
    shapes: Shapes = {}
    _linear(shapes, "img_in", d, in_channels)
    embedders = [("time_in", 256), ("vector_in", vec_in_dim)] + ([("guidance_in", 256)] * guidance_embed)
    for name, in_dim in embedders:
        _linear(shapes, f"{name}.in_layer", d, in_dim)
        _linear(shapes, f"{name}.out_layer", d, d)
    _linear(shapes, "txt_in", d, context_in_dim)
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            _linear(shapes, f"{p}_mod.lin", 6 * d, d)
            _linear(shapes, f"{p}_attn.qkv", 3 * d, d)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (hd,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (hd,)
            _linear(shapes, f"{p}_attn.proj", d, d)
            _linear(shapes, f"{p}_mlp.0", mlp, d)
            _linear(shapes, f"{p}_mlp.2", d, mlp)
    for i in range(depth_single_blocks):
        p = f"single_blocks.{i}"
        _linear(shapes, f"{p}.linear1", 3 * d + mlp, d)
        _linear(shapes, f"{p}.linear2", d, d + mlp)
        shapes[f"{p}.norm.query_norm.scale"] = (hd,)
        shapes[f"{p}.norm.key_norm.scale"] = (hd,)
        _linear(shapes, f"{p}.modulation.lin", 3 * d, d)
    _linear(shapes, "final_layer.linear", out_channels, d)
    _linear(shapes, "final_layer.adaLN_modulation.1", 2 * d, d)
    return shapes


def expected_ae_shapes(
    in_channels: int, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int
) -> Shapes:
    """Section 2.2: resnets, 1x1-conv attention, no quant convs; decoder levels carry one extra resnet."""
    shapes: Shapes = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def group_norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(p: str, cin: int, cout: int) -> None:
        group_norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin, 3)
        group_norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def mid(p: str, c: int) -> None:
        resnet(f"{p}.mid.block_1", c, c)
        group_norm(f"{p}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{proj}", c, c, 1)
        resnet(f"{p}.mid.block_2", c, c)

    last = len(ch_mult) - 1
    conv("encoder.conv_in", ch, in_channels, 3)
    block_in = ch
    for level, mult in enumerate(ch_mult):
        for b in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{b}", block_in, ch * mult)
            block_in = ch * mult
        if level != last:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    group_norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z_channels, block_in, 3)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z_channels, 3)
    mid("decoder", block_in)
    for level in reversed(range(len(ch_mult))):
        for b in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{b}", block_in, ch * ch_mult[level])
            block_in = ch * ch_mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    group_norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", out_ch, block_in, 3)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shapes_of(module: torch.nn.Module) -> Shapes:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _meta_flux(params: FluxParams) -> Flux:
    with torch.device("meta"):
        return Flux(params)


def _meta_ae(params: AutoEncoderParams) -> AutoEncoder:
    with torch.device("meta"):
        return AutoEncoder(params)


def _assert_same_table(got: Shapes, expected: Shapes) -> None:
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong, f"wrong shapes (got, expected): {wrong}"


def _structure(keys) -> set[str]:
    """Keys with block indices replaced by N: the per-block layout, independent of depth."""
    return {re.sub(r"^(double_blocks|single_blocks)\.\d+\.", r"\1.N.", k) for k in keys}


def _top_level_order(keys) -> list[str]:
    order: list[str] = []
    for k in keys:
        top = k.split(".")[0]
        if not order or order[-1] != top:
            order.append(top)
    return order


def test_generated_tables_reproduce_documented_shapes():
    """Spot checks: the generator above yields the literal shapes printed in sections 2.1 and 2.2."""
    dev = expected_flux_shapes(**FULL, guidance_embed=True)
    assert dev["img_in.weight"] == (3072, 64)
    assert dev["time_in.in_layer.weight"] == (3072, 256)
    assert dev["vector_in.in_layer.weight"] == (3072, 768)
    assert dev["guidance_in.out_layer.weight"] == (3072, 3072)
    assert dev["txt_in.weight"] == (3072, 4096)
    assert dev["double_blocks.18.txt_mod.lin.weight"] == (18432, 3072)
    assert dev["double_blocks.0.img_attn.qkv.bias"] == (9216,)
    assert dev["double_blocks.0.img_attn.norm.key_norm.scale"] == (128,)
    assert dev["double_blocks.0.img_mlp.0.weight"] == (12288, 3072)
    assert dev["double_blocks.0.img_mlp.2.weight"] == (3072, 12288)
    assert dev["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert dev["single_blocks.37.linear2.weight"] == (3072, 15360)
    assert dev["single_blocks.0.modulation.lin.weight"] == (9216, 3072)
    assert dev["final_layer.linear.weight"] == (64, 3072)
    assert dev["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    per_double = sum(_numel(s) for k, s in dev.items() if k.startswith("double_blocks.0."))
    per_single = sum(_numel(s) for k, s in dev.items() if k.startswith("single_blocks.0."))
    assert (per_double, per_single) == (339_831_296, 141_591_808)

    ae = expected_ae_shapes(**FULL_AE)
    assert ae["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert ae["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert ae["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert ae["encoder.down.2.downsample.conv.weight"] == (512, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in ae
    assert ae["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert ae["decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert ae["decoder.up.3.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert ae["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert ae["decoder.up.1.upsample.conv.weight"] == (256, 256, 3, 3)
    assert ae["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in ae
    assert ae["decoder.conv_out.weight"] == (3, 128, 3, 3)


@pytest.mark.parametrize("name", REAL)
def test_real_config_params_match_reference(name):
    p = CONFIGS[name].params
    for field, value in FULL.items():
        assert getattr(p, field) == value, field
    assert (p.axes_dim, p.theta, p.qkv_bias) == ([16, 56, 56], 10_000, True)
    assert p.guidance_embed is (name != "flux-schnell")
    ae = CONFIGS[name].ae_params
    for field, value in FULL_AE.items():
        assert getattr(ae, field) == value, field
    assert (ae.scale_factor, ae.shift_factor) == (0.3611, 0.1159)


@pytest.mark.parametrize(
    ("name", "n_tensors", "n_params"),
    [
        ("flux-schnell", 776, 11_891_178_560),
        ("flux-dev", 780, 11_901_408_320),
        ("flux-dev-krea", 780, 11_901_408_320),
    ],
)
def test_flux_state_dict_matches_reference_layout(name, n_tensors, n_params):
    spec = CONFIGS[name]
    got = _shapes_of(_meta_flux(spec.params))
    expected = expected_flux_shapes(**FULL, guidance_embed=spec.params.guidance_embed)
    _assert_same_table(got, expected)
    assert len(got) == len(expected) == n_tensors
    assert sum(_numel(s) for s in got.values()) == sum(_numel(s) for s in expected.values()) == n_params

    keys = list(got)
    assert keys[0] == "img_in.weight" and keys[-1].startswith("final_layer.")
    top = ["img_in", "time_in", "vector_in", "guidance_in", "txt_in"]
    top += ["double_blocks", "single_blocks", "final_layer"]
    if name == "flux-schnell":
        top.remove("guidance_in")
        assert not any(k.startswith("guidance_in") for k in keys)
    assert _top_level_order(keys) == top
    double_ids = [int(k.split(".")[1]) for k in keys if k.startswith("double_blocks.")]
    single_ids = [int(k.split(".")[1]) for k in keys if k.startswith("single_blocks.")]
    assert double_ids == sorted(double_ids) and set(double_ids) == set(range(19))
    assert single_ids == sorted(single_ids) and set(single_ids) == set(range(38))


def test_krea_has_the_dev_architecture():
    assert _shapes_of(_meta_flux(CONFIGS["flux-dev-krea"].params)) == _shapes_of(
        _meta_flux(CONFIGS["flux-dev"].params)
    )


@pytest.mark.parametrize("name", REAL)
def test_ae_state_dict_matches_reference_layout(name):
    got = _shapes_of(_meta_ae(CONFIGS[name].ae_params))
    _assert_same_table(got, expected_ae_shapes(**FULL_AE))
    assert len(got) == 244
    assert sum(_numel(s) for s in got.values()) == 83_819_683
    enc = {k: s for k, s in got.items() if k.startswith("encoder.")}
    dec = {k: s for k, s in got.items() if k.startswith("decoder.")}
    assert len(enc) + len(dec) == len(got)
    assert (len(enc), sum(_numel(s) for s in enc.values())) == (106, 34_274_208)
    assert (len(dec), sum(_numel(s) for s in dec.values())) == (138, 49_545_475)
    assert not any("quant_conv" in k for k in got)


def test_flux_tiny_has_the_real_layout_at_toy_size():
    p = CONFIGS["flux-tiny"].params
    got = _shapes_of(_meta_flux(p))
    expected = expected_flux_shapes(
        p.in_channels,
        p.out_channels,
        p.vec_in_dim,
        p.context_in_dim,
        p.hidden_size,
        p.mlp_ratio,
        p.num_heads,
        p.depth,
        p.depth_single_blocks,
        p.guidance_embed,
    )
    _assert_same_table(got, expected)
    assert sum(p.axes_dim) == p.hidden_size // p.num_heads
    # Same per-block key structure as the real dev model (tiny embeds guidance too), only fewer blocks.
    dev_keys = _meta_flux(CONFIGS["flux-dev"].params).state_dict().keys()
    assert _structure(got) == _structure(dev_keys)
    assert _top_level_order(list(got)) == _top_level_order(list(dev_keys))


def test_flux_tiny_ae_layout():
    ae = CONFIGS["flux-tiny"].ae_params
    got = _shapes_of(_meta_ae(ae))
    _assert_same_table(
        got,
        expected_ae_shapes(ae.in_channels, ae.ch, ae.out_ch, ae.ch_mult, ae.num_res_blocks, ae.z_channels),
    )
    # 8x compression like the real AE: three resamplings each way.
    assert sum("downsample" in k for k in got) == sum("upsample" in k for k in got) == 2 * 3


def _file_shapes(path) -> Shapes:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def test_generators_agree_with_reference_golden_weights(golden_dir):
    """The golden weights were written by the reference code, so they check the generators themselves."""
    flux = _file_shapes(golden_dir / "tiny_flux_weights.safetensors")
    _assert_same_table(
        flux,
        expected_flux_shapes(
            in_channels=64,
            out_channels=64,
            vec_in_dim=16,
            context_in_dim=32,
            hidden_size=64,
            mlp_ratio=4.0,
            num_heads=2,
            depth=2,
            depth_single_blocks=3,
            guidance_embed=True,
        ),
    )
    ae = _file_shapes(golden_dir / "tiny_ae_weights.safetensors")
    _assert_same_table(ae, expected_ae_shapes(3, 32, 3, [1, 2, 2, 2], 2, 16))
