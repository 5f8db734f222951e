"""Semantics that are easy to get subtly wrong (flux_reference.md sections 3, 4 and 8).

Every expected value is worked out here with plain math or torch, independently of the function under test.
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

import flux.layers
from flux.autoencoder import AutoEncoder
from flux.configs import CONFIGS
from flux.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    Modulation,
    RMSNorm,
    SingleStreamBlock,
    timestep_embedding,
)
from flux.math import apply_rope
from flux.model import Flux
from flux.sampling import (
    denoise,
    get_lin_function,
    get_noise,
    get_schedule,
    img_ids_for,
    pack,
    prepare,
    unpack,
)

TINY = CONFIGS["flux-tiny"].params


# ---------------------------------------------------------------------------------------------------------
# Helpers worked out by hand


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise (torch.testing imports slowly)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    assert bool((err <= bound).all()), f"max abs error {err.max().item():.3g} (atol {atol}, rtol {rtol})"


def hand_embedding(s: float, dim: int) -> Tensor:
    """[cos(s f_0) .. cos(s f_{h-1}), sin(s f_0) .. sin(s f_{h-1})] with f_i = exp(-ln(10000) i / h)."""
    half = dim // 2
    freqs = [math.exp(-math.log(10_000) * i / half) for i in range(half)]
    return torch.tensor(
        [math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs], dtype=torch.float64
    )


def round_bf16(x: float) -> float:
    """Round to the nearest bfloat16 (8 significant bits, ties to even)."""
    _, e = math.frexp(x)  # x = m * 2**e with 0.5 <= |m| < 1
    step = 2.0 ** (e - 8)
    return round(x / step) * step


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim without affine parameters."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def identity_pe(n_tokens: int, head_dim: int) -> Tensor:
    """pe (1, 1, N, head_dim / 2, 2, 2) of identity rotations: attention without position information."""
    return torch.eye(2).expand(1, 1, n_tokens, head_dim // 2, 2, 2)


@contextmanager
def recording(model: nn.Module, inputs: Sequence[str] = (), outputs: Sequence[str] = ()) -> Iterator[dict]:
    """Record the first positional input ("name:in") or the output ("name:out") of named submodules.

    The hooks exist only inside the context and are removed even when the body raises.
    """
    seen: dict[str, object] = {}
    handles = []
    try:
        for n in inputs:
            hook = lambda _m, args, n=n: seen.__setitem__(f"{n}:in", args[0])
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
        for n in outputs:
            hook = lambda _m, _args, out, n=n: seen.__setitem__(f"{n}:out", out)
            handles.append(model.get_submodule(n).register_forward_hook(hook))
        yield seen
    finally:
        for h in handles:
            h.remove()


def tiny_flux(**overrides) -> Flux:
    torch.manual_seed(0)
    return Flux(dataclasses.replace(TINY, **overrides)).eval()


# ---------------------------------------------------------------------------------------------------------
# Timestep embedding (section 3.1)


def test_timestep_embedding_is_cos_first():
    emb = timestep_embedding(torch.tensor([0.5]), 8)
    assert emb.shape == (1, 8) and emb.dtype == torch.float32
    assert_close(emb[0].double(), hand_embedding(500.0, 8), atol=1e-4, rtol=0)


def test_hand_bf16_rounding():
    assert round_bf16(0.625) == 0.625
    assert round_bf16(1000 * 0.625) == 624  # spacing 4 in [512, 1024)
    assert round_bf16(0.55) == 0.55078125
    assert round_bf16(1000 * round_bf16(0.55)) == 552
    assert round_bf16(1000 * round_bf16(3.5)) == 3504  # spacing 16 in [2048, 4096)
    assert torch.tensor(0.55, dtype=torch.bfloat16).item() == 0.55078125


@pytest.mark.parametrize(("t", "s_bf16"), [(0.625, 624.0), (0.55, 552.0), (3.5, 3504.0)])
def test_timestep_embedding_scales_in_input_dtype(t, s_bf16):
    assert round_bf16(1000 * round_bf16(t)) == s_bf16
    emb = timestep_embedding(torch.tensor([t], dtype=torch.bfloat16), 256)
    assert emb.dtype == torch.bfloat16
    assert_close(emb[0].double(), hand_embedding(s_bf16, 256), atol=1e-2, rtol=0)
    # The unrounded 1000 * t gives a clearly different embedding, so the check above is discriminating.
    assert (emb[0].double() - hand_embedding(1000 * t, 256)).abs().max() > 0.1
    # In float32 nothing is rounded.
    emb32 = timestep_embedding(torch.tensor([t]), 256)
    assert_close(emb32[0].double(), hand_embedding(1000 * t, 256), atol=1e-3, rtol=0)


def test_timestep_frequencies_are_computed_on_the_cpu():
    # The reference builds the frequencies on the CPU and moves them to t's device (a GPU's exp can differ
    # in the last bit). With t on the meta device, any exp that runs elsewhere than the CPU shows up here.
    from torch.utils._python_dispatch import TorchDispatchMode

    import flux.layers

    flux.layers._frequencies.cache_clear()  # they are computed once per device, then reused
    devices = []

    class RecordExp(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.exp:
                devices.append(args[0].device.type)
            return func(*args, **(kwargs or {}))

    with RecordExp():
        emb = timestep_embedding(torch.tensor([0.5], device="meta"), 8)
        timestep_embedding(torch.tensor([0.25], device="meta"), 8)
    assert emb.device.type == "meta" and emb.shape == (1, 8)
    assert devices == ["cpu"]  # once: the second call reuses them
    # Made under inference mode (as in the sampler), they still serve a forward that records gradients.
    with torch.inference_mode():
        timestep_embedding(torch.tensor([0.5]), 6)
    t = torch.tensor([0.5], requires_grad=True)
    timestep_embedding(t, 6).sum().backward()
    assert t.grad is not None


def test_conditioning_sums_time_guidance_and_vector():
    model = tiny_flux()
    t, g = 0.625, 3.5
    y = torch.randn(1, TINY.vec_in_dim)
    with torch.no_grad():
        vec = model.conditioning(torch.tensor([t]), y, torch.tensor([g]))
        emb_t, emb_g = (hand_embedding(1000 * v, 256).float()[None] for v in (t, g))
        expected = model.time_in(emb_t) + model.guidance_in(emb_g) + model.vector_in(y)
    assert_close(vec, expected, atol=1e-4, rtol=1e-4)


def test_conditioning_in_bf16_rounds_guidance_to_3504():
    model = tiny_flux().to(torch.bfloat16)
    y = torch.randn(1, TINY.vec_in_dim, dtype=torch.bfloat16)
    bf = dict(dtype=torch.bfloat16)
    with torch.no_grad():
        vec = model.conditioning(torch.tensor([0.625], **bf), y, torch.tensor([3.5], **bf))
        emb_t, emb_g = (hand_embedding(s, 256).to(torch.bfloat16)[None] for s in (624.0, 3504.0))
        expected = model.time_in(emb_t) + model.guidance_in(emb_g) + model.vector_in(y)
        unrounded = model.guidance_in(hand_embedding(3500.0, 256).to(torch.bfloat16)[None])
    assert_close(vec.float(), expected.float(), atol=3e-2, rtol=3e-2)
    assert (model.guidance_in(emb_g) - unrounded).abs().max() > 0.1


def test_conditioning_requires_guidance_when_embedded():
    model = tiny_flux()
    with pytest.raises(ValueError):
        model.conditioning(torch.tensor([0.5]), torch.randn(1, TINY.vec_in_dim), None)


def test_model_without_guidance_embed_has_no_guidance_params_and_accepts_none():
    model = tiny_flux(guidance_embed=False)
    assert not any(k.startswith("guidance_in") for k in model.state_dict())
    with torch.no_grad():
        vec = model.conditioning(torch.tensor([0.5]), torch.randn(1, TINY.vec_in_dim), None)
    assert vec.shape == (1, TINY.hidden_size)


def test_inconsistent_head_dim_raises():
    with pytest.raises(ValueError):
        Flux(dataclasses.replace(TINY, axes_dim=[4, 14, 12]))
    with pytest.raises(ValueError):
        Flux(dataclasses.replace(TINY, num_heads=3))


# ---------------------------------------------------------------------------------------------------------
# Modulation order (sections 3.5, 3.9)


def test_rms_norm_is_float32_with_eps_1e_6_then_cast_then_scaled():
    """x / sqrt(mean(x^2) + 1e-6) computed in float32, cast to x's dtype, then times the learned scale: a
    bf16 norm differs by up to two bf16 steps, and the eps shows on small inputs."""
    torch.manual_seed(0)
    norm = RMSNorm(128)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(128) + 0.5)
        x = (torch.randn(64, 128) * 3).bfloat16()
        x32 = x.float()
        expected = (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.scale
        assert torch.equal(norm(x), expected)
        small = RMSNorm(4)(torch.full((1, 4), 1e-3))  # 1e-3 / sqrt(1e-6 + 1e-6)
    assert_close(small, torch.full((1, 4), 1 / math.sqrt(2)))


def test_final_layer_is_shift_then_scale():
    d, shift, scale = 8, 0.3, 2.0
    layer = LastLayer(hidden_size=d, patch_size=1, out_channels=d)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.eye(d))
        layer.linear.bias.zero_()
        layer.adaLN_modulation[1].weight.zero_()
        layer.adaLN_modulation[1].bias.copy_(torch.cat([torch.full((d,), shift), torch.full((d,), scale)]))
        x, vec = torch.randn(2, 5, d), torch.randn(2, d)
        out = layer(x, vec)
    assert_close(out, (1 + scale) * layer_norm(x) + shift)


def test_modulation_chunks_are_shift_scale_gate():
    d = 4
    for double, n in ((True, 6), (False, 3)):
        mod = Modulation(d, double=double)
        with torch.no_grad():
            mod.lin.weight.zero_()
            mod.lin.bias.copy_(torch.arange(n).repeat_interleave(d).float())  # chunk i is the constant i
            first, second = mod(torch.randn(2, d))
        assert first.shift.shape == (2, 1, d)
        triples = [first, second] if double else [first]
        got = [[m.shift.unique().item(), m.scale.unique().item(), m.gate.unique().item()] for m in triples]
        assert got == ([[0, 1, 2], [3, 4, 5]] if double else [[0, 1, 2]])
        assert double or second is None


def _set_modulation(lin: nn.Linear, chunks: list[float], d: int) -> None:
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor(chunks).repeat_interleave(d))


def test_single_block_modulates_before_linear1_and_gates_the_residual():
    torch.manual_seed(0)
    d, heads, n = 8, 2, 5
    block = SingleStreamBlock(d, heads, mlp_ratio=2.0)
    x, vec, pe = torch.randn(1, n, d), torch.randn(1, d), identity_pe(n, d // heads)
    shift, scale = 0.5, 1.5
    outs = {}
    for gate in (0.0, 1.0, 2.0):
        _set_modulation(block.modulation.lin, [shift, scale, gate], d)
        with recording(block, inputs=["linear1"]) as seen, torch.no_grad():
            outs[gate] = block(x, vec=vec, pe=pe)
        assert_close(seen["linear1:in"], (1 + scale) * layer_norm(x) + shift)
    assert torch.equal(outs[0.0], x)
    assert_close(outs[2.0] - x, 2 * (outs[1.0] - x))


def test_double_block_modulation_order():
    torch.manual_seed(0)
    d, heads, n_img, n_txt = 8, 2, 5, 3
    block = DoubleStreamBlock(d, heads, mlp_ratio=2.0, qkv_bias=True)
    img, txt, vec = torch.randn(1, n_img, d), torch.randn(1, n_txt, d), torch.randn(1, d)
    pe = identity_pe(n_txt + n_img, d // heads)
    img_chunks = [0.5, 1.5, 0.0, -0.75, 0.25, 0.0]  # shift1, scale1, gate1, shift2, scale2, gate2
    txt_chunks = [0.1, 2.0, 0.0, 0.3, -0.5, 0.0]
    _set_modulation(block.img_mod.lin, img_chunks, d)
    _set_modulation(block.txt_mod.lin, txt_chunks, d)
    names = ["img_attn.qkv", "img_mlp.0", "txt_attn.qkv", "txt_mlp.0"]
    with recording(block, inputs=names) as seen, torch.no_grad():
        img_out, txt_out = block(img=img, txt=txt, vec=vec, pe=pe)
    # Zero gates leave both streams untouched, so the MLP sees the block's input, modulated by mod2.
    assert torch.equal(img_out, img) and torch.equal(txt_out, txt)
    for stream, x, c in (("img", img, img_chunks), ("txt", txt, txt_chunks)):
        assert_close(seen[f"{stream}_attn.qkv:in"], (1 + c[1]) * layer_norm(x) + c[0])
        assert_close(seen[f"{stream}_mlp.0:in"], (1 + c[4]) * layer_norm(x) + c[3])

    # Gates at chunk 2 (attention) and chunk 5 (MLP) scale the residual updates linearly.
    def img_delta(gate1: float, gate2: float) -> Tensor:
        _set_modulation(block.img_mod.lin, [0.5, 1.5, gate1, -0.75, 0.25, gate2], d)
        with torch.no_grad():
            return block(img=img, txt=txt, vec=vec, pe=pe)[0] - img

    assert_close(img_delta(2.0, 0.0), 2 * img_delta(1.0, 0.0))
    assert_close(img_delta(0.0, 2.0), 2 * img_delta(0.0, 1.0))
    assert img_delta(1.0, 0.0).abs().max() > 1e-3 and img_delta(0.0, 1.0).abs().max() > 1e-3


def test_mlps_use_tanh_gelu():
    """GELU(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), not the erf form."""
    x = torch.tensor([-2.0, -0.5, 1.0, 3.0])
    expected = torch.tensor(
        [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in x.tolist()]
    )
    double, single = DoubleStreamBlock(8, 2, mlp_ratio=2.0), SingleStreamBlock(8, 2, mlp_ratio=2.0)
    for act in (double.img_mlp[1], double.txt_mlp[1], single.mlp_act):
        assert_close(act(x), expected, atol=1e-6, rtol=0)
    assert (expected[2] - 0.5 * (1 + math.erf(1 / math.sqrt(2)))).abs() > 1e-4  # erf GELU(1) differs


# ---------------------------------------------------------------------------------------------------------
# Text first (sections 3.6 to 3.8)


def test_double_block_attends_over_txt_then_img(monkeypatch):
    torch.manual_seed(0)
    d, heads, n_img, n_txt = 8, 2, 5, 3
    block = DoubleStreamBlock(d, heads, mlp_ratio=2.0, qkv_bias=True)
    img, txt, vec = torch.randn(1, n_img, d), torch.randn(1, n_txt, d), torch.randn(1, d)
    pe = identity_pe(n_txt + n_img, d // heads)
    joint: dict[str, object] = {}
    real_attention = flux.layers.attention

    def spy(q, k, v, pe):
        joint["qkv"] = (q, k, v)
        joint["out"] = real_attention(q, k, v, pe=pe)
        return joint["out"]

    monkeypatch.setattr(flux.layers, "attention", spy)
    norms, projs = ["img_attn.norm", "txt_attn.norm"], ["img_attn.proj", "txt_attn.proj"]
    with recording(block, inputs=projs, outputs=norms) as seen, torch.no_grad():
        img_out, txt_out = block(img=img, txt=txt, vec=vec, pe=pe)
    assert img_out.shape == img.shape and txt_out.shape == txt.shape  # (img, txt) order
    (img_q, img_k), (txt_q, txt_k) = seen["img_attn.norm:out"], seen["txt_attn.norm:out"]
    q, k, _ = joint["qkv"]
    assert torch.equal(q, torch.cat((txt_q, img_q), dim=2)) and torch.equal(
        k, torch.cat((txt_k, img_k), dim=2)
    )
    assert torch.equal(seen["txt_attn.proj:in"], joint["out"][:, :n_txt])
    assert torch.equal(seen["img_attn.proj:in"], joint["out"][:, n_txt:])


@pytest.mark.parametrize(("img_shape", "txt_shape"), [((1, 4, 64), (1, 3)), ((4, 64), (1, 3, 64))])
def test_flux_refuses_inputs_without_a_batch_and_a_sequence_axis(img_shape, txt_shape):
    with torch.device("meta"):
        model = Flux(TINY)
        img, txt = torch.zeros(img_shape), torch.zeros(txt_shape)
    with pytest.raises(ValueError, match=r"must be \(B, N, C\)"):
        model(img, torch.zeros(1, 4, 3), txt, torch.zeros(1, 3, 3), torch.zeros(1), torch.zeros(1, 8))


def test_flux_sequence_and_ids_are_txt_first():
    model = tiny_flux()
    n_txt, h, w = 3, 4, 6  # latent 4x6 -> 2x3 = 6 image tokens
    img = torch.randn(1, (h // 2) * (w // 2), TINY.in_channels)
    txt = torch.randn(1, n_txt, TINY.context_in_dim)
    img_ids = img_ids_for(1, h, w)
    txt_ids = torch.full((1, n_txt, 3), 100.0)  # distinguishable from every image id
    last_double, last_single = (
        f"double_blocks.{TINY.depth - 1}",
        f"single_blocks.{TINY.depth_single_blocks - 1}",
    )
    t, y, g = torch.tensor([0.5]), torch.randn(1, TINY.vec_in_dim), torch.tensor([3.5])
    inputs, outputs = ["pe_embedder", "single_blocks.0", "final_layer"], [last_double, last_single]
    with recording(model, inputs, outputs) as seen, torch.no_grad():
        pred = model(img, img_ids, txt, txt_ids, t, y, g)
    assert torch.equal(seen["pe_embedder:in"], torch.cat((txt_ids, img_ids), dim=1))
    img_last_double, txt_last_double = seen[f"{last_double}:out"]
    x = seen["single_blocks.0:in"]
    assert torch.equal(x[:, :n_txt], txt_last_double) and torch.equal(x[:, n_txt:], img_last_double)
    assert seen[f"{last_single}:out"].shape == (1, n_txt + img.shape[1], TINY.hidden_size)
    assert torch.equal(seen["final_layer:in"], seen[f"{last_single}:out"][:, n_txt:])
    assert pred.shape == (1, img.shape[1], TINY.out_channels)


def test_single_block_output_rows_follow_txt_then_img():
    """Perturbing only the text changes rows :T of the first single block's input, not the image rows."""
    model = tiny_flux(depth=0)  # no double blocks: the single blocks see txt_in(txt) and img_in(img) directly
    n_txt, h, w = 3, 4, 6
    img = torch.randn(1, 6, TINY.in_channels)
    txt = torch.randn(1, n_txt, TINY.context_in_dim)
    img_ids, t, y, g = (
        img_ids_for(1, h, w),
        torch.tensor([0.5]),
        torch.randn(1, TINY.vec_in_dim),
        torch.tensor([3.5]),
    )

    def first_single_input(txt: Tensor) -> Tensor:
        with recording(model, inputs=["single_blocks.0"]) as seen, torch.no_grad():
            model(img, img_ids, txt, torch.zeros(1, n_txt, 3), t, y, g)
        return seen["single_blocks.0:in"]

    base, perturbed = first_single_input(txt), first_single_input(txt + 1.0)
    assert not torch.allclose(base[:, :n_txt], perturbed[:, :n_txt])
    assert torch.equal(base[:, n_txt:], perturbed[:, n_txt:])


# ---------------------------------------------------------------------------------------------------------
# RoPE (section 3.3)


def test_rope_rotates_adjacent_pairs_with_axis_split():
    # Head dim 12: pair 0 <- axis 0, pairs 1-3 <- axis 1, pairs 4-5 <- axis 2.
    axes_dim, theta = [2, 6, 4], 10_000
    ids = torch.tensor([[[3.0, 5.0, 7.0], [0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 40.0, 13.0]]])
    pe = EmbedND(dim=12, theta=theta, axes_dim=axes_dim)(ids)
    assert pe.shape == (1, 1, 4, 6, 2, 2) and pe.dtype == torch.float32

    # Angle of pair j for each token, worked out per axis: pos * theta^(-2k / d_axis).
    pair_axis = [(0, 0, 2), (1, 0, 6), (1, 1, 6), (1, 2, 6), (2, 0, 4), (2, 1, 4)]  # (axis, k, d_axis)
    angles = torch.tensor(
        [[ids[0, n, a].item() * theta ** (-2 * k / d) for a, k, d in pair_axis] for n in range(4)],
        dtype=torch.float64,
    )
    cos, sin = angles.cos(), angles.sin()
    expected_pe = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    assert_close(pe[0, 0].double(), expected_pe, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 4, 12), torch.randn(1, 2, 4, 12)
    q_rot, k_rot = apply_rope(q, k, pe)
    for x, x_rot in ((q, q_rot), (k, k_rot)):
        x = x.double()
        even, odd = x[..., 0::2], x[..., 1::2]
        expected = torch.empty_like(x)
        expected[..., 0::2] = cos * even - sin * odd
        expected[..., 1::2] = sin * even + cos * odd
        assert_close(x_rot.double(), expected, atol=1e-5, rtol=0)
    # Token 2 sits at the origin (like every text token): not rotated.
    assert_close(q_rot[:, :, 2], q[:, :, 2])


def test_rope_pairs_adjacent_channels_not_halves():
    pe = EmbedND(dim=4, theta=10_000, axes_dim=[4])(torch.tensor([[[1.0]]]))  # pair 0 angle 1 rad
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    rotated, _ = apply_rope(x, x, pe)
    assert_close(rotated.flatten(), torch.tensor([math.cos(1.0), math.sin(1.0), 0.0, 0.0]))


def test_apply_rope_keeps_dtype():
    pe = EmbedND(dim=4, theta=10_000, axes_dim=[4])(torch.tensor([[[3.0]]]))
    x = torch.randn(1, 1, 1, 4, dtype=torch.bfloat16)
    q, k = apply_rope(x, x, pe)
    assert q.dtype == k.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# Schedule (section 4.3)


def test_schnell_schedule_is_linear():
    assert get_schedule(4, 256, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_shifted_schedule_at_1024_squared():
    assert get_schedule(4, 4096) == pytest.approx([1.0, 0.90453, 0.75951, 0.51284, 0.0], abs=1e-5)


@pytest.mark.parametrize(("seq_len", "mu"), [(256, 0.5), (1024, 0.63), (4080, 1.14729), (4096, 1.15)])
def test_mu(seq_len, mu):
    m = (1.15 - 0.5) / (4096 - 256)
    b = 0.5 - 256 * m
    assert m == pytest.approx(1.69271e-4, rel=1e-5) and b == pytest.approx(0.456667, rel=1e-6)
    assert m * seq_len + b == pytest.approx(mu, abs=1e-5)
    assert get_lin_function()(seq_len) == pytest.approx(mu, abs=1e-5)


def test_shifted_schedule_formula():
    mu = (1.15 - 0.5) / (4096 - 256) * 1024 + 0.5 - 256 * (1.15 - 0.5) / (4096 - 256)
    ts = [1 - i / 10 for i in range(11)]
    expected = [1.0] + [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts[1:-1]] + [0.0]
    assert get_schedule(10, 1024) == pytest.approx(expected, rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Patchify, ids, prepare (sections 4.2, 4.5)


def test_pack_token_and_channel_order():
    c, h, w = 16, 4, 6
    x = torch.randn(1, c, h, w)
    tokens = pack(x)
    assert tokens.shape == (1, (h // 2) * (w // 2), c * 4)
    for r in range(h // 2):
        for col in range(w // 2):
            token = r * (w // 2) + col  # row-major
            for ch in range(c):
                for ph in range(2):
                    for pw in range(2):
                        assert tokens[0, token, ch * 4 + ph * 2 + pw] == x[0, ch, 2 * r + ph, 2 * col + pw]
    assert torch.equal(unpack(tokens, 8 * h, 8 * w), x)


def test_img_ids_are_zero_row_col():
    ids = img_ids_for(2, 4, 6)
    assert ids.shape == (2, 6, 3) and ids.dtype == torch.float32
    expected = torch.tensor([[0.0, r, c] for r in range(2) for c in range(3)])
    assert torch.equal(ids[0], expected) and torch.equal(ids[1], expected)


def test_prepare():
    img = torch.randn(2, 16, 4, 6)
    txt, vec = torch.randn(1, 5, 32), torch.randn(1, 16)
    inp = prepare(img, txt, vec)
    assert torch.equal(inp["img"], pack(img))
    assert torch.equal(inp["img_ids"], img_ids_for(2, 4, 6))
    assert torch.equal(inp["txt"], txt.expand(2, -1, -1)) and torch.equal(inp["vec"], vec.expand(2, -1))
    assert torch.equal(inp["txt_ids"], torch.zeros(2, 5, 3))
    # Positions stay float32 when the model runs in bf16, as in the reference (docs/capture_format.md).
    bf16 = prepare(img.bfloat16(), txt.bfloat16(), vec.bfloat16())
    assert bf16["img"].dtype == bf16["txt"].dtype == torch.bfloat16
    assert bf16["img_ids"].dtype == bf16["txt_ids"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# Autoencoder scale and shift (section 2.2)


def test_the_autoencoder_gives_the_same_values_with_and_without_gradients():
    # Without gradients its swish runs in place (a buffer fewer); with them, out of place, and a gradient
    # must reach the input.
    from flux.configs import TINY_AE_PARAMS

    torch.manual_seed(0)
    ae = AutoEncoder(TINY_AE_PARAMS).eval()
    z = torch.randn(1, TINY_AE_PARAMS.z_channels, 8, 6)
    with torch.inference_mode():
        fast = ae.decode(z)
    z.requires_grad_(True)
    slow = ae.decode(z)
    assert torch.equal(fast, slow.detach())
    slow.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    image = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        assert torch.equal(ae.encode(image), ae.encode(image.clone().requires_grad_(True)))


class _Constant(nn.Module):
    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return self.value


class _Spy(nn.Module):
    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value
        self.seen: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.seen = x
        return self.value


def test_ae_encode_returns_scaled_mean():
    ae = AutoEncoder(CONFIGS["flux-tiny"].ae_params)
    moments = torch.randn(1, 32, 2, 3)
    ae.encoder = _Constant(moments)
    z = ae.encode(torch.randn(1, 3, 16, 24))
    assert_close(z, 0.3611 * (moments[:, :16] - 0.1159))


def test_ae_attention_is_single_head_softmax_on_a_fused_kernel():
    """The VAE's mid attention must reach SDPA's fused kernels (a strided view falls back to the math kernel,
    whose HW x HW float32 scores take 17 GB a copy for one 2048 px image) and still be plain softmax
    attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flux.autoencoder import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 6, 5)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = block(x)  # "No available kernel" if q, k, v are not laid out for the fused kernels

        def tokens(conv: nn.Conv2d) -> Tensor:  # (B, HW, C), position-major
            return conv(block.norm(x)).flatten(2).transpose(1, 2)

        q, k, v = tokens(block.q), tokens(block.k), tokens(block.v)
        mixed = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32), dim=-1) @ v
        expected = x + block.proj_out(mixed.transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_decoder_returns_to_its_up_blocks_dtype_after_the_mid_block():
    """The mid block may run in another dtype (bf16 under autocast): the up blocks still get theirs."""
    ae = AutoEncoder(CONFIGS["flux-tiny"].ae_params)
    seen = []
    ae.decoder.mid.block_2.register_forward_hook(lambda _m, _a, out: out.bfloat16())
    ae.decoder.up[-1].block[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with torch.no_grad():
        image = ae.decoder(torch.randn(1, 16, 2, 3))
    assert seen == [torch.float32] and image.dtype == torch.float32


def test_ae_decode_unscales_before_the_decoder():
    ae = AutoEncoder(CONFIGS["flux-tiny"].ae_params)
    image = torch.randn(1, 3, 16, 24)
    ae.decoder = spy = _Spy(image)
    z = torch.randn(1, 16, 2, 3)
    assert torch.equal(ae.decode(z), image)
    assert_close(spy.seen, z / 0.3611 + 0.1159)


# ---------------------------------------------------------------------------------------------------------
# Noise and the Euler sampler (sections 4.1, 4.4)


@pytest.mark.parametrize(
    ("height", "width", "shape"), [(64, 96, (8, 12)), (100, 50, (14, 8)), (16, 17, (2, 4))]
)
def test_noise_shape(height, width, shape):
    noise = get_noise(2, height, width, device="cpu", dtype=torch.float32, seed=0)
    assert noise.shape == (2, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)) == (2, 16, *shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_is_seeded_cpu_randn_in_requested_dtype(dtype):
    noise = get_noise(1, 64, 96, device="cpu", dtype=dtype, seed=7)
    expected = torch.randn(1, 16, 8, 12, dtype=dtype, generator=torch.Generator("cpu").manual_seed(7))
    assert noise.dtype == dtype
    assert torch.equal(noise, expected)
    assert torch.equal(noise, get_noise(1, 64, 96, device="cpu", dtype=dtype, seed=7))
    assert not torch.equal(noise, get_noise(1, 64, 96, device="cpu", dtype=dtype, seed=8))


class _VelocityStub(nn.Module):
    """Predicts v = t everywhere and records what the sampler passes in."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        self.calls.append((timesteps, guidance))
        return torch.ones_like(img) * timesteps[:, None, None]


def test_denoise_is_euler_with_negative_dt():
    stub = _VelocityStub()
    img = torch.zeros(2, 3, 4)
    ts = [1.0, 0.6, 0.2, 0.0]
    out = denoise(stub, img, None, None, None, None, ts, guidance=3.5)
    expected = (
        (0.6 - 1.0) * 1.0 + (0.2 - 0.6) * 0.6 + (0.0 - 0.2) * 0.2
    )  # sum of (t_prev - t_curr) * v(t_curr)
    assert_close(out, torch.full_like(img, expected))
    assert [c[0].tolist() for c in stub.calls] == [
        [1.0, 1.0],
        [0.6000000238418579] * 2,
        [0.20000000298023224] * 2,
    ]
    assert all(torch.equal(c[1], torch.tensor([3.5, 3.5])) for c in stub.calls)


def test_denoise_passes_timesteps_in_the_latent_dtype():
    stub = _VelocityStub()
    denoise(stub, torch.zeros(1, 3, 4, dtype=torch.bfloat16), None, None, None, None, [1.0, 0.55, 0.0], 3.5)
    assert [c[0].dtype for c in stub.calls] == [torch.bfloat16] * 2
    assert stub.calls[1][0].item() == round_bf16(0.55)
    # Guidance too: a float32 guidance vector would meet the bf16 guidance embedder's weights.
    assert [(c[1].dtype, c[1].tolist()) for c in stub.calls] == [(torch.bfloat16, [3.5])] * 2


def test_prepare_repeats_a_batch_of_one_to_match_the_other_side():
    img = torch.randn(1, 16, 4, 6)
    txt, vec = torch.randn(3, 5, 32), torch.randn(3, 16)
    inp = prepare(img, txt, vec)
    assert inp["img"].shape == (3, 6, 64) and inp["img_ids"].shape == (3, 6, 3)
    assert torch.equal(inp["img"][2], inp["img"][0]) and inp["txt_ids"].shape == (3, 5, 3)
    inp = prepare(torch.randn(2, 16, 4, 6), txt[:1], vec[:1])
    assert inp["txt"].shape == (2, 5, 32) and inp["vec"].shape == (2, 16)
