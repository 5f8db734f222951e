"""Replays and interventions on flux-tiny captures, on the CPU in float32 (exact)."""

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import platform
from datetime import datetime

import numpy as np
import pytest
import torch
from PIL import Image

from flux.capture import CapturePlan
from flux.configs import get_spec
from flux.decode import decode_latents
from flux.errors import UsageError, UserError
from flux.interventions import Intervener, Intervention, parse_interventions, parse_steps, replay
from flux.pipeline import RunOptions, generate, load_models
from flux.store import load_capture
from flux.sweep import (
    SweepRow,
    contact_sheet,
    mse,
    psnr,
    replay_command,
    ssim,
    sweep,
    sweep_command,
    to_unit,
)

NUM_STEPS = 4


@pytest.fixture(scope="module")
def models():
    return load_models(RunOptions(model="flux-tiny").spec, "cpu")


def _capture(models, folder, prompt="a red cube", **kw):
    opts = RunOptions(
        model="flux-tiny",
        prompt=prompt,
        seed=1,
        output_dir=str(folder),
        should_decode_intermediates=False,
        **{"width": 64, "height": 48, **kw},
    ).validate()
    return generate(models, opts, progress=False).capture_path


@pytest.fixture(scope="module")
def captures(models, tmp_path_factory):
    """(path, capture) of 'a red cube', and of 'a blue ball' with the same seed (a patch source)."""
    folder = tmp_path_factory.mktemp("captures")
    main = _capture(models, folder / "main")
    other = _capture(models, folder / "other", prompt="a blue ball")
    return (main, load_capture(main)), (other, load_capture(other))


@pytest.fixture
def flow(models):
    return models.flow


def _everything(flow):
    return CapturePlan.everything(flow, NUM_STEPS)


def _out(result, stream, block, step):
    return result.capture[f"{stream}_blocks"][f"block_{block}"][step]


def _stored(capture, stream, block, step):
    return capture[f"{stream}_blocks"][f"block_{block}"][step]


def _no_hooks(model):
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
        for m in model.modules()
    )


# ------------------------------------------------------------------------------------------ replay
def test_replay_without_interventions_is_exact(flow, captures):
    (_, cap), _ = captures
    result = replay(flow, cap, record=_everything(flow))
    assert torch.equal(result.latent, cap["denoising_context"]["final_latent"])
    for step in range(NUM_STEPS):
        for i in range(len(flow.double_blocks)):
            for got, want in zip(_out(result, "double", i, step), _stored(cap, "double", i, step)):
                assert torch.equal(got, want)
        for i in range(len(flow.single_blocks)):
            assert torch.equal(_out(result, "single", i, step), _stored(cap, "single", i, step))
        assert torch.equal(
            result.capture["denoising_context"]["img_state"][step],
            cap["denoising_context"]["img_state"][step],
        )


def test_a_recorded_replay_describes_itself_not_its_source(flow, captures):
    (_, cap), _ = captures
    plan = CapturePlan((0,), (2,), (2,), "img", torch.float16)
    result = replay(flow, cap, start=1, stop=2, record=plan)
    meta = result.capture["metadata"]
    assert meta["shapes"] == {
        "double_blocks.0.img": [1, 12, flow.hidden_size],
        "single_blocks.2": [1, 12, flow.hidden_size],
    }
    assert result.capture["double_blocks"]["block_0"][0][0].shape == (1, 12, flow.hidden_size)
    assert (
        result.capture["single_blocks"]["block_2"][0].dtype == torch.float16
        and meta["capture_dtype"] == "float16"
    )
    # Stopped before the last step: no final latent, so not complete; the context holds steps 0..2.
    assert meta["complete"] is False and meta["steps_done"] == [0, 1, 2]
    assert "final_latent" not in result.capture["denoising_context"]
    assert "files" not in meta and "estimated_capture_bytes" not in meta  # the source's, not this capture's
    assert meta["seed"] == cap["metadata"]["seed"] and meta["replayed_steps"] == [1, 2]
    # Made now, here: the replayed run's time, device and versions are kept apart.
    made = ("timestamp", "device", "device_name", "versions")
    assert meta["source_run"] == {k: cap["metadata"][k] for k in made}
    # Compared as times, not strings: a local time with its offset goes back an hour when summer time ends.
    made_at = [datetime.strptime(m["timestamp"], "%Y-%m-%dT%H:%M:%S%z") for m in (cap["metadata"], meta)]
    assert made_at[1] >= made_at[0] and meta["device"] == "cpu"
    # The device that replayed it (a capture made on another machine would name that one).
    relabelled = {**cap, "metadata": {**cap["metadata"], "device": "cuda:0", "device_name": "NVIDIA H200"}}
    again = replay(flow, relabelled, start=1, stop=2, record=plan).capture["metadata"]
    assert (again["device"], again["device_name"]) == ("cpu", platform.machine())
    assert again["source_run"]["device_name"] == "NVIDIA H200"
    # A replay of that replay still names the run first captured.
    assert (
        replay(flow, result.capture, start=1, stop=2, record=plan).capture["metadata"]["source_run"]
        == (meta["source_run"])
    )
    assert meta["interventions"] == [] and meta["applied"] == []


def test_replay_from_a_later_step_and_a_single_step(flow, captures):
    (_, cap), _ = captures
    ctx = cap["denoising_context"]
    late = replay(flow, cap, start=2, record=_everything(flow))
    assert torch.equal(late.latent, ctx["final_latent"])
    assert late.capture["metadata"]["captured_steps"] == [2, 3]
    assert torch.equal(late.capture["single_blocks"]["block_2"][0], _stored(cap, "single", 2, 2))
    one = replay(flow, cap, start=1, stop=1)
    assert torch.equal(one.latent, ctx["img_state"][2])
    # x0 of a middle step, worked out from the stored latents alone: the Euler step
    # img_2 = img_1 + (t_prev - t_curr) * pred gives pred, and x0 = img_1 + (0 - t_curr) * pred.
    t_curr, t_prev = ctx["timestep_pairs"][1]
    pred = (ctx["img_state"][2] - ctx["img_state"][1]) / (t_prev - t_curr)
    assert torch.allclose(one.x0, ctx["img_state"][1] - t_curr * pred, rtol=0, atol=1e-5)
    assert not torch.allclose(one.x0, one.latent, rtol=0, atol=1e-2)  # an estimate, not the next latent
    # At the last step the sampler steps to t_prev = 0, so x0 is the latent it steps to.
    assert ctx["timestep_pairs"][NUM_STEPS - 1][1] == 0
    last = replay(flow, cap, start=NUM_STEPS - 1)
    assert torch.equal(last.x0, last.latent)


def test_replay_rejects_steps_out_of_range(flow, captures):
    (_, cap), _ = captures
    with pytest.raises(UsageError, match=r"0\.\.3"):
        replay(flow, cap, start=2, stop=4)


# ------------------------------------------------------------------------------------------ skip / zero
def test_skip_double_block_changes_only_what_follows(flow, captures):
    (_, cap), _ = captures
    step = 1
    result = replay(
        flow, cap, interventions=[Intervention("skip", "double", 1, (step,))], record=_everything(flow)
    )
    assert result.applied == [("skip:double:1@1", 1)]
    # Before the step nothing changed; at the step, block 0 is unchanged and block 1 passes block 0's output.
    for i in range(2):
        assert all(
            torch.equal(a, b) for a, b in zip(_out(result, "double", i, 0), _stored(cap, "double", i, 0))
        )
    assert all(
        torch.equal(a, b) for a, b in zip(_out(result, "double", 0, step), _stored(cap, "double", 0, step))
    )
    img0, txt0 = _out(result, "double", 0, step)
    img1, txt1 = _out(result, "double", 1, step)
    assert torch.equal(img1, img0) and torch.equal(txt1, txt0)
    assert not torch.equal(img1, _stored(cap, "double", 1, step)[0])
    for i in range(len(flow.single_blocks)):
        assert not torch.equal(_out(result, "single", i, step), _stored(cap, "single", i, step))
    assert not torch.equal(result.latent, cap["denoising_context"]["final_latent"])


def test_skip_single_block(flow, captures):
    (_, cap), _ = captures
    step = 2
    result = replay(
        flow, cap, interventions=[Intervention("skip", "single", 1, (step,))], record=_everything(flow)
    )
    assert torch.equal(_out(result, "single", 0, step), _stored(cap, "single", 0, step))
    assert torch.equal(_out(result, "single", 1, step), _out(result, "single", 0, step))
    assert not torch.equal(_out(result, "single", 2, step), _stored(cap, "single", 2, step))
    assert torch.equal(_out(result, "single", 2, step - 1), _stored(cap, "single", 2, step - 1))


def test_zero_drops_the_update_of_the_chosen_tokens_only(flow, captures):
    (_, cap), _ = captures
    t_len = int(cap["denoising_context"]["txt_seq_len"])
    ivs = [Intervention("zero", "double", 1, (0,), "img"), Intervention("zero", "single", 1, (0,), "txt")]
    result = replay(flow, cap, stop=0, interventions=ivs, record=_everything(flow))
    img0, _ = _out(result, "double", 0, 0)
    img1, txt1 = _out(result, "double", 1, 0)
    assert torch.equal(img1, img0)  # image tokens: input passed through
    assert torch.equal(txt1, _stored(cap, "double", 1, 0)[1])  # text tokens: the normal update
    s0, s1 = _out(result, "single", 0, 0), _out(result, "single", 1, 0)
    assert torch.equal(s1[:, :t_len], s0[:, :t_len])
    assert not torch.equal(s1[:, t_len:], s0[:, t_len:])


def test_zero_of_both_streams_is_skip(flow, captures):
    (_, cap), _ = captures
    final = cap["denoising_context"]["final_latent"]
    for stream in ("double", "single"):
        zero = replay(flow, cap, interventions=[Intervention("zero", stream, 1, (1, 2), "both")])
        skip = replay(flow, cap, interventions=[Intervention("skip", stream, 1, (1, 2))])
        assert torch.equal(zero.latent, skip.latent)
        assert not torch.equal(skip.latent, final)  # a real change, not two interventions that do nothing


# ------------------------------------------------------------------------------------------ patch / add
def test_patch_with_own_output_changes_nothing(flow, captures):
    (_, cap), _ = captures
    ivs = [Intervention("patch", "double", 0, None, "both", source=cap)]
    ivs += [Intervention("patch", "single", 2, (1, 2), "img", source=cap)]
    result = replay(flow, cap, interventions=ivs)
    assert len(result.applied) == NUM_STEPS + 2
    assert torch.equal(result.latent, cap["denoising_context"]["final_latent"])


def test_patch_from_another_capture_puts_its_tokens_in(flow, captures):
    (_, cap), (_, other) = captures
    t_len = int(cap["denoising_context"]["txt_seq_len"])
    iv = Intervention("patch", "single", 1, (2,), "img", source=other)
    result = replay(flow, cap, interventions=[iv], record=_everything(flow))
    got = _out(result, "single", 1, 2)
    assert torch.equal(got[:, t_len:], _stored(other, "single", 1, 2)[:, t_len:])
    assert torch.equal(got[:, :t_len], _stored(cap, "single", 1, 2)[:, :t_len])
    assert not torch.equal(result.latent, cap["denoising_context"]["final_latent"])


def test_a_source_of_some_steps_gives_the_tokens_of_the_step_patched_not_of_its_list_position(
    models, flow, captures, tmp_path
):
    """A source captured with --steps 1,3 holds step 3 at list position 1: the patch must read step 3's."""
    (_, cap), (_, other) = captures
    part = load_capture(_capture(models, tmp_path, prompt="a blue ball", steps="1,3"))
    assert part["metadata"]["captured_steps"] == [1, 3]
    t_len = int(cap["denoising_context"]["txt_seq_len"])
    iv = Intervention("patch", "single", 1, (3,), "img", source=part)
    got = _out(replay(flow, cap, interventions=[iv], record=_everything(flow)), "single", 1, 3)
    assert torch.equal(got[:, t_len:], _stored(other, "single", 1, 3)[:, t_len:])
    # Patching at every step needs the source to hold every step: refused, naming the ones it lacks.
    with pytest.raises(UserError, match=r"no block outputs at steps \[0, 2\]"):
        replay(flow, cap, interventions=[Intervention("patch", "single", 1, None, "img", source=part)])
    assert _no_hooks(flow)


def test_patch_sources_are_read_between_model_calls_not_inside_them(
    models, flow, captures, tmp_path, monkeypatch
):
    """A safetensors source is read from disk, and a read inside a block's hook would stall the forward pass
    between blocks: each step's patch tokens are fetched before the model call."""
    import flux.interventions

    (_, cap), (_, other) = captures
    lazy = load_capture(_capture(models, tmp_path, prompt="a blue ball", format="safetensors"))
    inside, reads, real = [False], [], flux.interventions.source_tokens

    def read(iv, step):
        reads.append((iv.stream, step, inside[0]))
        return real(iv, step)

    monkeypatch.setattr(flux.interventions, "source_tokens", read)
    handles = [
        flow.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
        flow.register_forward_hook(lambda *_: inside.__setitem__(0, False)),
    ]
    ivs = [
        Intervention("patch", "single", 1, (1, 2), "img", source=lazy),
        Intervention("patch", "double", 0, None, "both", source=lazy),
    ]
    try:
        result = replay(flow, cap, interventions=ivs)
    finally:
        for handle in handles:
            handle.remove()
    expected = [("single", 1, False), ("single", 2, False)] + [("double", k, False) for k in range(NUM_STEPS)]
    assert sorted(reads) == sorted(expected)
    # The same seed's .pt capture holds the same tokens, so patching from it gives the same image.
    same = replay(flow, cap, interventions=[dataclasses.replace(iv, source=other) for iv in ivs])
    assert torch.equal(result.latent, same.latent)
    assert not torch.equal(result.latent, cap["denoising_context"]["final_latent"])


def test_patch_needs_matching_shapes(models, flow, captures, tmp_path):
    (_, cap), _ = captures
    small = load_capture(_capture(models, tmp_path, width=128))
    with pytest.raises(UserError, match="same model at the same width, height"):
        replay(flow, cap, interventions=[Intervention("patch", "double", 0, (0,), source=small)])
    assert _no_hooks(flow)


def test_a_patch_source_must_share_the_grid_and_the_schedule(models, flow, captures, tmp_path):
    """As many tokens is not enough: 48x64 has 64x48's 12 image tokens in a 3x4 grid, where each would land
    elsewhere; a 6-step run's step 1 is at another noise level than a 4-step run's."""
    (_, cap), _ = captures
    turned = load_capture(_capture(models, tmp_path / "turned", width=48, height=64))
    longer = load_capture(_capture(models, tmp_path / "longer", num_steps=NUM_STEPS + 2))
    for source, words in ((turned, "is 48x64 and this run 64x48"), (longer, "ran another schedule")):
        with pytest.raises(UserError, match=words):
            replay(flow, cap, interventions=[Intervention("patch", "double", 0, (1,), source=source)])
    assert _no_hooks(flow)


def test_an_intervention_at_a_step_the_run_does_not_have_is_refused(flow, captures):
    (_, cap), _ = captures
    for steps in ((NUM_STEPS,), (NUM_STEPS - 1, NUM_STEPS)):
        with pytest.raises(UsageError, match=f"this run has steps 0 to {NUM_STEPS - 1}"):
            replay(flow, cap, interventions=[Intervention("skip", "double", 0, steps)])
    assert _no_hooks(flow)


def test_an_intervention_the_replay_never_reaches_is_refused(flow, captures):
    (_, cap), _ = captures
    with pytest.raises(UsageError, match=r"applies at steps 3, none of which this replay runs \(0..1\)"):
        replay(flow, cap, stop=1, interventions=[Intervention("skip", "double", 0, (3,))])
    # A step before the first replayed one made the stored latent the replay starts from, without it: the
    # replay could not apply it, so it is refused, wholly or partly before.
    for steps, early in (((0,), "0"), ((1, 2, 3), "1"), ((0, 1, 3), "0-1")):
        with pytest.raises(UsageError, match=f"applies at steps {early}, before step 2, where this replay"):
            replay(flow, cap, start=2, interventions=[Intervention("skip", "double", 0, steps)])
    # Steps after the last replayed one are simply not reached; what was applied says so.
    result = replay(flow, cap, start=1, stop=2, interventions=[Intervention("skip", "double", 0, (2, 3))])
    assert result.applied == [("skip:double:0@2-3", 2)]
    with pytest.raises(UsageError, match="names no step"):
        Intervention("skip", "double", 0, ())


def test_add_direction(flow, captures):
    (_, cap), _ = captures
    d = torch.randn(flow.hidden_size, generator=torch.Generator().manual_seed(0))
    zero = replay(flow, cap, interventions=[Intervention("add", "double", 0, None, "img", 0.0, direction=d)])
    assert torch.equal(zero.latent, cap["denoising_context"]["final_latent"])
    iv = Intervention("add", "double", 0, (0,), "img", 1.0, direction=d)
    result = replay(flow, cap, stop=0, interventions=[iv], record=_everything(flow))
    img, txt = _out(result, "double", 0, 0)
    stored_img, stored_txt = _stored(cap, "double", 0, 0)
    assert torch.equal(img, stored_img + d) and torch.equal(txt, stored_txt)
    with pytest.raises(UserError, match="does not broadcast"):
        replay(flow, cap, interventions=[Intervention("add", "double", 0, direction=torch.ones(3))])


def test_add_a_per_token_direction(flow, captures):
    """A (1, L, D) direction: one vector per image token, added to the image tokens only (in a single
    block they sit after the text tokens)."""
    (_, cap), _ = captures
    ctx = cap["denoising_context"]
    t_len, img_len = int(ctx["txt_seq_len"]), ctx["img_state"][0].shape[1]
    d = torch.randn(1, img_len, flow.hidden_size, generator=torch.Generator().manual_seed(3))
    for stream in ("double", "single"):
        nothing = replay(
            flow, cap, interventions=[Intervention("add", stream, 1, direction=torch.zeros_like(d))]
        )
        assert torch.equal(nothing.latent, ctx["final_latent"])

    iv = Intervention("add", "single", 1, (0,), scale=2.5, direction=d)
    result = replay(flow, cap, stop=0, interventions=[iv], record=_everything(flow))
    stored = _stored(cap, "single", 1, 0)
    got = _out(result, "single", 1, 0)
    assert torch.equal(got[:, t_len:], stored[:, t_len:] + 2.5 * d)
    assert torch.equal(got[:, :t_len], stored[:, :t_len])
    assert torch.equal(_out(result, "single", 0, 0), _stored(cap, "single", 0, 0))  # blocks before: as stored

    # Over a whole run: the same as the addition written by hand as an fn intervention.
    add = replay(flow, cap, interventions=[Intervention("add", "double", 0, (1, 3), scale=2.5, direction=d)])

    def by_hand(img, txt, step):
        return img + 2.5 * d, txt

    fn = replay(flow, cap, interventions=[Intervention("fn", "double", 0, (1, 3), fn=by_hand)])
    assert torch.equal(add.latent, fn.latent)
    assert not torch.equal(add.latent, ctx["final_latent"])


def test_replay_command_adds_a_per_token_direction_file(captures, tmp_path, monkeypatch):
    (path, cap), _ = captures
    ctx = cap["denoising_context"]
    t_len, img_len = int(ctx["txt_seq_len"]), ctx["img_state"][0].shape[1]
    d = torch.randn(1, img_len, 64, generator=torch.Generator().manual_seed(4))  # flux-tiny: D = 64
    torch.save(d, tmp_path / "direction.pt")
    monkeypatch.chdir(tmp_path)  # a relative path is recorded as the file it names
    replay_command(str(path), intervention="add:single:2@1*-3", direction="direction.pt",
                   output_dir=str(tmp_path), save_capture=True, device="cpu", progress=False)  # fmt: skip
    assert json.loads((tmp_path / "replay_0.json").read_text())["direction"] == str(tmp_path / "direction.pt")
    saved = load_capture(tmp_path / "replay_0.pt")
    got, stored = _stored(saved, "single", 2, 1), _stored(cap, "single", 2, 1)
    assert torch.equal(got[:, t_len:], stored[:, t_len:] + -3.0 * d)
    assert torch.equal(got[:, :t_len], stored[:, :t_len])
    assert json.loads((tmp_path / "replay_0.json").read_text())["vs_stored_final"]["mse"] > 0
    files = saved["metadata"]["files"]
    assert files["capture"] == str(tmp_path / "replay_0.pt") and saved["metadata"]["format"] == "pt"
    assert files["image_sha256"] == hashlib.sha256((tmp_path / "replay_0.jpg").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ hooks
def test_hooks_are_removed_after_a_run_and_after_an_error(flow, captures):
    (_, cap), _ = captures
    ivs = [Intervention("skip", "double", 0), Intervention("zero", "single", 2, tokens="img")]
    replay(flow, cap, interventions=ivs, record=_everything(flow))
    assert _no_hooks(flow)

    def boom(pairs):
        yield pairs[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        replay(flow, cap, interventions=ivs, record=_everything(flow), progress=boom)
    assert _no_hooks(flow)
    with pytest.raises(KeyError), Intervener(flow, ivs, txt_len=32) as iv:
        assert len(iv.handles) == 2 and not _no_hooks(flow)
        raise KeyError
    assert _no_hooks(flow)


# ------------------------------------------------------------------------------------------ parsing
def test_parse_specs():
    ivs = parse_interventions(
        "skip:double:1@0-2; zero:single:2:txt ;add:single:0@3*-2.5", 2, 3, 4, direction=torch.ones(64)
    )
    assert [(iv.kind, iv.stream, iv.block, iv.steps, iv.tokens, iv.scale) for iv in ivs] == [
        ("skip", "double", 1, (0, 1, 2), "both", 1.0),
        ("zero", "single", 2, None, "txt", 1.0),
        ("add", "single", 0, (3,), "img", -2.5),
    ]
    assert [iv.spec for iv in ivs] == ["skip:double:1@0-2", "zero:single:2:txt@all", "add:single:0@3*-2.5"]
    assert parse_interventions([iv.spec for iv in ivs], 2, 3, 4, direction=torch.ones(64)) == ivs
    assert parse_interventions(None, 2, 3, 4) == []
    assert parse_steps((0, 3), 4) == (0, 3) and parse_steps("all", 4) is None  # Fire gives tuples


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("skip:double", "Cannot read"),
        ("skip:triple:1", "Cannot read"),
        ("bypass:double:1", "Cannot read"),
        ("zero:double:1:pixels", "Cannot read"),
        ("skip:double:7", "double blocks go from 0 to 1"),
        ("skip:single:0@2-9", "out of range"),
        ("skip:single:0@x", "cannot read 'x'"),
        ("skip:double:1*2", "only applies to add"),
        ("skip:double:1:img", "bypasses the whole block"),
        ("patch:double:1", "--source"),
        ("add:double:1", "--direction"),
        ("add:double:1:txt", "image tokens only"),
    ],
)
def test_malformed_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_interventions(spec, 2, 3, 4)


# ------------------------------------------------------------------------------------------ scores
def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    """size x size Gaussian weights centred on the middle pixel, summing to 1."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def _reference_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two (C, H, W) images in [0, 1] as Wang et al. 2004 define it, one window at a time.

    At every position where the whole window fits in the image (the 'valid' region of their ssim_index.m):
    Gaussian-weighted means, variances and covariance of the window, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with
    L = 1, then the mean of the SSIM map over positions and channels.
    """
    w = _gaussian_window(size, sigma)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64), strict=True):
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                px, py = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def _ssim_pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 19, 23, generator=gen)
    amount = torch.linspace(0.0, 0.4, noise.shape[-1])  # more noise to the right: windows see different stats
    noisy = (noise + amount * torch.randn(noise.shape, generator=gen)).clamp(0, 1)
    i, j = torch.meshgrid(torch.arange(21.0), torch.arange(26.0), indexing="ij")
    c = torch.arange(3.0)[:, None, None]
    pattern = (0.5 + 0.35 * torch.sin(i / 2.5 + c) * torch.cos(j / 3.5 - c) + 0.1 * (j / 26))[None]
    shifted = torch.roll(pattern, 1, dims=-1)  # the same structure one pixel to the right
    dimmer = 0.2 + 0.6 * pattern + 0.05 * torch.randn(pattern.shape, generator=gen)  # contrast and noise
    return {
        "random": (noise, noisy),
        "structured": (pattern.expand(2, -1, -1, -1), torch.cat((shifted, dimmer))),
    }


@pytest.mark.parametrize("name", ["random", "structured"])
def test_ssim_is_the_gaussian_windowed_ssim_of_wang_et_al(name):
    a, b = _ssim_pairs()[name]
    got = ssim(a, b)
    assert got.shape == (a.shape[0],)
    for n in range(a.shape[0]):
        want = _reference_ssim(a[n].numpy(), b[n].numpy())
        assert 0.1 < want < 0.97  # far from the trivial cases (identical or constant images)
        assert math.isclose(float(got[n]), want, abs_tol=1e-6), (n, float(got[n]), want)
        # These images tell windows apart: another sigma or size gives a value far outside the tolerance.
        for size, sigma in ((11, 3.0), (7, 1.5)):
            assert abs(_reference_ssim(a[n].numpy(), b[n].numpy(), size, sigma) - want) > 1e-4


def test_pixel_scores_map_decoded_images_from_minus_one_one_to_zero_one():
    def full(v):
        return torch.full((1, 3, 8, 8), v)

    assert torch.equal(to_unit(torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.5])),
                       torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))  # fmt: skip
    black, grey, white = to_unit(full(-1.0)), to_unit(full(0.0)), to_unit(full(1.0))
    assert float(mse(black, white)[0]) == 1.0 and float(psnr(black, white)[0]) == 0.0
    assert float(mse(grey, white)[0]) == 0.25  # 0.5 apart in [0, 1]: 0.25, PSNR 10 log10(4)
    assert math.isclose(float(psnr(grey, white)[0]), 10 * math.log10(4), rel_tol=1e-6)
    assert float(mse(to_unit(full(1.7)), white)[0]) == 0.0  # clamped first, as the saved JPEGs are
    assert float(psnr(grey, grey)[0]) == math.inf


def test_sweep_scores_follow_their_formulas_on_the_decoded_images(models, flow, captures):
    """Each row's scores, worked out by hand from an independent replay and decode of the same change."""
    (_, cap), _ = captures
    height, width = cap["metadata"]["height"], cap["metadata"]["width"]
    final = cap["denoising_context"]["final_latent"]
    blocks = [("double", 1), ("single", 0)]
    rows, _, base_latent = sweep(flow, models.ae, cap, "skip", blocks, progress=False)
    assert torch.equal(base_latent, final)  # the reference is the unmodified run

    def unit(latent):  # decoded (3, H, W) in about [-1, 1] -> [0, 1], clamped
        decoded = decode_latents(latent, models.ae, height, width)[0].double().numpy()
        return decoded, (np.clip(decoded, -1, 1) + 1) / 2

    base_raw, base = unit(final)
    assert np.abs(base_raw).max() > 1  # the decoder overshoots, so the clamp matters
    assert [(r.stream, r.block) for r in rows] == blocks
    for row in rows:
        latent = replay(flow, cap, interventions=[Intervention("skip", row.stream, row.block)]).latent
        _, img = unit(latent)
        want_mse = float(np.mean((img - base) ** 2))
        assert want_mse > 0
        assert math.isclose(row.mse, want_mse, rel_tol=1e-4)
        assert math.isclose(row.psnr, 10 * math.log10(1 / want_mse), rel_tol=1e-5)
        assert math.isclose(row.ssim, _reference_ssim(img, base), abs_tol=1e-6)
        want_latent = float(((latent.double() - final.double()) ** 2).mean())
        assert math.isclose(row.latent_mse, want_latent, rel_tol=1e-5)


def test_a_sweep_replays_only_from_the_first_step_it_intervenes_at(models, flow, captures):
    """Steps before the first intervened one would run exactly as stored: the unmodified replay and each
    block's replay start at step 2 of 4, so each runs the model twice, not four times."""
    (_, cap), _ = captures
    calls = []
    handle = flow.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        rows, _, base_latent = sweep(flow, models.ae, cap, "skip", [("double", 1), ("single", 0)], (2, 3),
                                     progress=False)  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == 2 * (1 + len(rows)) and len(rows) == 2
    assert torch.equal(base_latent, cap["denoising_context"]["final_latent"])


def test_an_offloaded_sweep_shares_each_visit_of_the_flow_model_among_several_replays(
    models, flow, captures, monkeypatch
):
    """With --offload every visit moves the whole flow model to the GPU: a sweep replays up to
    `replays_per_visit` blocks per visit, then decodes their images with the flow model gone, and scores
    them as one replay per visit does. Rows already done are neither replayed nor counted in a visit."""
    import flux.decode
    import flux.sweep

    (_, cap), _ = captures
    blocks = [("double", 0), ("double", 1), ("single", 0), ("single", 1), ("single", 2)]  # all of them
    alone, _, _ = sweep(flow, models.ae, cap, "skip", blocks, (2, 3), progress=False)
    events = []
    real_replay, real_decode = flux.sweep.replay, flux.decode.decode_latents

    def replay(model, capture, start=0, *args, interventions=(), **kwargs):
        events.append(f"replay {' '.join(iv.spec for iv in interventions)}".strip())
        return real_replay(model, capture, start, *args, interventions=interventions, **kwargs)

    def decode(*args, **kwargs):
        events.append("decode")
        return real_decode(*args, **kwargs)

    @contextlib.contextmanager
    def visit():
        events.append("visit")
        yield
        events.append("leave")

    monkeypatch.setattr(flux.sweep, "replay", replay)
    monkeypatch.setattr(flux.decode, "decode_latents", decode)
    made = []
    rows, _, _ = sweep(flow, models.ae, cap, "skip", blocks, (2, 3), progress=False, done=alone[1:2],
                       on_row=made.append, visit=visit, replays_per_visit=3)  # fmt: skip
    specs = [f"skip:{s}:{i}@2-3" for s, i in blocks]
    assert events == [
        "visit", "replay", "leave", "decode",  # the unmodified reference
        "visit", f"replay {specs[0]}", f"replay {specs[2]}", f"replay {specs[3]}", "leave", *["decode"] * 3,
        "visit", f"replay {specs[4]}", "leave", "decode",
    ]  # fmt: skip
    assert [r.spec for r in made] == [specs[i] for i in (0, 2, 3, 4)]
    assert [r.spec for r in rows] == specs and rows[1] is alone[1]  # in block order, the done row as given
    for row, want in zip(rows, alone):
        assert (row.mse, row.psnr, row.ssim, row.latent_mse) == (
            want.mse,
            want.psnr,
            want.ssim,
            want.latent_mse,
        )


def test_scores_match_their_formulas():
    a = torch.full((1, 3, 16, 16), 0.5)
    b = torch.full((1, 3, 16, 16), 0.6)
    assert math.isclose(float(psnr(a, b)[0]), 20.0, rel_tol=1e-5)  # MSE 0.01 -> 10 log10(100)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2))
    # Constant images: variance and covariance are zero, so SSIM is the luminance term alone.
    c1 = 0.01**2
    assert math.isclose(float(ssim(a, b)[0]), (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------ contact sheet
# Solid colours far from each other and from the sheet's white background and black captions, so a tile
# is found by its colour wherever the layout puts it.
COLOURS = [(220, 30, 30), (30, 190, 30), (30, 30, 220), (220, 220, 30), (220, 30, 220), (30, 210, 210)]


def _solid(colour, size=(64, 48)):
    return Image.new("RGB", size, colour)


def _tile_order(sheet: Image.Image, colours, size=(64, 48), tolerance=40) -> list:
    """The colours in the order their tiles appear on a one-row sheet, left to right; each must fill
    one image-sized block (JPEG noise allowed)."""
    px = np.asarray(sheet.convert("RGB")).astype(int)
    found = []
    for colour in colours:
        ys, xs = np.nonzero((np.abs(px - np.array(colour)) <= tolerance).all(-1))
        assert len(ys) >= 0.9 * size[0] * size[1], (colour, len(ys))
        assert xs.max() - xs.min() + 1 <= size[0] + 2 and ys.max() - ys.min() + 1 <= size[1] + 2, colour
        found.append((xs.mean(), ys.mean(), colour))
    assert max(y for _, y, _ in found) - min(y for _, y, _ in found) < 2  # one row
    return [colour for _, _, colour in sorted(found)]


def test_contact_sheet_order_is_unmodified_then_most_disruptive_first():
    reference, *altered = COLOURS
    # (block, mse, latent_mse): blocks 1 and 3 tie on pixel MSE, so the larger latent MSE goes first.
    scores = [(0, 0.2, 5.0), (1, 0.5, 1.0), (2, 0.1, 9.0), (3, 0.5, 2.0), (4, 0.3, 0.0)]
    rows = [
        SweepRow(f"skip:single:{b}@all", "single", b, m, 10 * math.log10(1 / m), 0.5, lat, _solid(colour))
        for (b, m, lat), colour in zip(scores, altered, strict=True)
    ]
    sheet = contact_sheet(rows, _solid(reference))
    by_block = dict(zip(range(5), altered, strict=True))
    assert _tile_order(sheet, COLOURS, tolerance=0) == [reference] + [by_block[b] for b in (3, 1, 4, 0, 2)]


def test_sweep_command_sheet_shows_the_images_it_wrote_in_rank_order(captures, tmp_path, monkeypatch):
    """The command's own sheet, with the sweep replaced by one whose images are told apart at a glance
    (flux-tiny's real altered images differ by less than JPEG noise)."""
    import flux.sweep

    (path, _), _ = captures
    reference, *altered = COLOURS
    mses = {("double", 0): 0.01, ("double", 1): 0.04, ("single", 0): 0.02, ("single", 1): 0.03}
    colour_of = dict(zip(mses, altered, strict=False))

    def fake_sweep(model, ae, capture, kind, blocks, *args, on_reference, on_row, **kwargs):
        latent = capture["denoising_context"]["final_latent"]
        on_reference(latent, _solid(reference))
        rows = [
            SweepRow(
                f"{kind}:{s}:{i}@all",
                s,
                i,
                mses[s, i],
                10 * math.log10(1 / mses[s, i]),
                0.5,
                mses[s, i],
                _solid(colour_of[s, i]),
            )
            for s, i in blocks
        ]
        for row in rows:
            on_row(row)
        return rows, _solid(reference), latent

    monkeypatch.setattr(flux.sweep, "sweep", fake_sweep)
    out = tmp_path / "sheet"
    sweep_command(str(path), "skip", blocks="double:0-1,single:0-1", output_dir=str(out), device="cpu")
    with open(out / "sweep.csv") as f:
        ranked = [f"{r['stream']}_block_{r['block']}" for r in csv.DictReader(f)]
    assert ranked == ["double_block_1", "single_block_1", "single_block_0", "double_block_0"]

    def colour(name):  # the mean colour of an image the sweep wrote, snapped to the nearest of COLOURS
        with Image.open(out / f"{name}.jpg") as img:
            mean = np.asarray(img.convert("RGB")).reshape(-1, 3).mean(0)
        return min(COLOURS, key=lambda c: np.abs(mean - np.array(c)).max())

    written = [colour(name) for name in ["unmodified", *ranked]]
    assert written == [reference, colour_of["double", 1], colour_of["single", 1], colour_of["single", 0],
                       colour_of["double", 0]]  # fmt: skip
    with Image.open(out / "contact_sheet.jpg") as sheet:
        assert _tile_order(sheet, written) == written


# ------------------------------------------------------------------------------------------ commands
def test_sweep_writes_ranked_rows_chart_and_sheet(captures, tmp_path):
    (path, _), _ = captures
    sweep_command(str(path), "skip", output_dir=str(tmp_path / "sweep"), device="cpu")
    out = tmp_path / "sweep"
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["stream"], int(r["block"])) for r in rows) == [("double", 0), ("double", 1)] + [
        ("single", i) for i in range(3)
    ]
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("mse", "psnr", "ssim", "latent_mse"))
    mses = [float(r["mse"]) for r in rows]
    assert mses == sorted(mses, reverse=True) and [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    with Image.open(out / "sweep.png") as png:
        assert png.format == "PNG"
        png.verify()
    with Image.open(out / "contact_sheet.jpg") as sheet:  # its order: test_contact_sheet_order_...
        assert sheet.format == "JPEG" and sheet.width * sheet.height >= 6 * 64 * 48  # room for six images
    record = json.loads((out / "sweep.json").read_text())
    assert {r["intervention"] for r in record["rows"]} == {r["intervention"] for r in rows}
    assert "skip:double:0@all" in {r["intervention"] for r in rows}
    assert record["tokens"] == "both"  # what skip changes, though --tokens was left out
    assert (out / "single_block_2.jpg").is_file()


def test_sweep_of_patches_from_the_same_capture_changes_nothing(captures, tmp_path):
    (path, _), _ = captures
    sweep_command(str(path), "patch", blocks="single:0-1", steps="1", tokens="img", source=str(path),
                  output_dir=str(tmp_path / "patch"), device="cpu")  # fmt: skip
    with open(tmp_path / "patch" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["mse"]) for r in rows] == [0.0, 0.0]
    assert [r["psnr"] for r in rows] == ["inf", "inf"]  # as the README says, literally
    assert [float(r["ssim"]) for r in rows] == [1.0, 1.0] and [r["latent_mse"] for r in rows] == ["0", "0"]
    assert {r["intervention"] for r in rows} == {"patch:single:0:img@1", "patch:single:1:img@1"}


def test_a_sweep_that_stops_keeps_its_finished_blocks_and_resumes_to_the_same_results(
    captures, tmp_path, monkeypatch, capsys
):
    import flux.sweep

    (path, _), _ = captures
    flags = {"blocks": "double:0-1,single:2", "steps": "1-3", "device": "cpu", "progress": False}
    whole = tmp_path / "whole"
    sweep_command(str(path), "skip", output_dir=str(whole), **flags)

    real, calls, stop = flux.sweep.replay, [], [True]

    def replay_until_the_second_block(model, capture, start=0, *args, interventions=(), **kwargs):
        calls.append([iv.spec for iv in interventions])
        if stop[0] and len(calls) == 3:  # the reference, one block, then Ctrl-C
            raise KeyboardInterrupt
        return real(model, capture, start, *args, interventions=interventions, **kwargs)

    monkeypatch.setattr(flux.sweep, "replay", replay_until_the_second_block)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        sweep_command(str(path), "skip", output_dir=str(out), **flags)
    assert f"stopped after 1 of 3 blocks; their results are in {out}" in capsys.readouterr().err
    state = json.loads((out / "sweep.json").read_text())
    assert state["complete"] is False and state["blocks_done"] == 1
    assert [r["intervention"] for r in state["rows"]] == ["skip:double:0@1-3"]
    assert {p.name for p in out.iterdir()} == {
        "sweep.json",
        "sweep.csv",
        "unmodified.jpg",
        "double_block_0.jpg",
    }

    calls.clear()
    stop[0] = False
    sweep_command(str(path), "skip", resume=str(out), **flags)
    assert calls == [[], ["skip:double:1@1-3"], ["skip:single:2@1-3"]]  # the reference, then the rest only
    resumed, first = (json.loads((d / "sweep.json").read_text()) for d in (out, whole))
    assert resumed["complete"] is True and resumed["blocks_done"] == 3
    assert resumed["rows"] == first["rows"]  # the same scores, in the same ranks
    assert resumed["reference_latent_sha256"] == first["reference_latent_sha256"]
    assert resumed["reference_vs_stored_latent_mse"] == 0.0  # on the capture's device: the stored run
    assert {p.name for p in whole.iterdir()} == {p.name for p in out.iterdir()}  # sheet and chart included


def test_resume_refuses_a_sweep_it_cannot_continue(captures, tmp_path):
    import flux.sweep

    (path, _), _ = captures
    flags = {"blocks": "double:0", "steps": "3", "device": "cpu", "progress": False}
    out = tmp_path / "done"
    sweep_command(str(path), "skip", output_dir=str(out), **flags)
    with pytest.raises(UsageError, match="that sweep is complete"):
        sweep_command(str(path), "skip", resume=str(out), **flags)
    state = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**state, "complete": False}))
    with pytest.raises(UsageError, match=r"other settings \(steps: '3' there, '2' now"):
        sweep_command(str(path), "skip", resume=str(out), **{**flags, "steps": "2"})
    with pytest.raises(UsageError, match=r"other settings \(other --blocks\)"):
        sweep_command(str(path), "skip", resume=str(out), **{**flags, "blocks": "double:0-1"})
    with pytest.raises(UsageError, match="leave out --output_dir"):
        sweep_command(str(path), "skip", resume=str(out), output_dir=str(out), **flags)
    with pytest.raises(UsageError, match="no sweep to resume there"):
        sweep_command(str(path), "skip", resume=str(tmp_path), **flags)
    (out / "sweep.json").write_text(json.dumps({**state, "complete": False, "reference_latent_sha256": "0"}))
    with pytest.raises(UserError, match="The unmodified replay differs from the one the sweep"):
        sweep_command(str(path), "skip", resume=str(out), **flags)
    assert (
        flux.sweep.latent_digest(torch.zeros(2, dtype=torch.bfloat16)) == hashlib.sha256(bytes(4)).hexdigest()
    )


def test_sweep_usage_errors(captures):
    (path, _), _ = captures
    with pytest.raises(UsageError, match="--source"):
        sweep_command(str(path), "patch")
    with pytest.raises(UsageError, match="one of skip"):
        sweep_command(str(path), "delete")


def test_replay_command_records_its_interventions(captures, tmp_path, capsys):
    (path, cap), _ = captures
    replay_command(str(path), intervention="skip:single:1@0-1", output_dir=str(tmp_path), save_capture=True,
                   device="cpu")  # fmt: skip
    record = json.loads((tmp_path / "replay_0.json").read_text())
    assert record["interventions"] == ["skip:single:1@0-1"]
    score = record["vs_stored_final"]
    assert score["mse"] > 0 and score["psnr"] == pytest.approx(10 * math.log10(1 / score["mse"]))
    summary = "2 changes made; against the stored final image: "  # steps 0 and 1
    summary += f"PSNR {score['psnr']:.1f} dB (MSE {score['mse']:.3g})."
    assert capsys.readouterr().out.splitlines()[-1] == summary
    with Image.open(tmp_path / "replay_0.jpg") as img:
        assert img.size == (cap["metadata"]["width"], cap["metadata"]["height"])
    saved = load_capture(tmp_path / "replay_0.pt")
    assert saved["metadata"]["interventions"] == ["skip:single:1@0-1"]
    assert torch.equal(saved["double_blocks"]["block_1"][0][0], _stored(cap, "double", 1, 0)[0])
    assert saved["metadata"]["replayed_from"] == {
        "capture": str(path.resolve()),
        "source": None,
        "direction": None,
    }
    replay_command(str(path), output_dir=str(tmp_path), device="cpu")
    assert json.loads((tmp_path / "replay_1.json").read_text())["vs_stored_final"]["mse"] == 0.0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "0 changes made; the image is the stored final image, exactly."
    )
    # A replay of the recorded capture starts from the same stored noise without the skip: the first run.
    replay_command(str(tmp_path / "replay_0.pt"), output_dir=str(tmp_path / "again"), device="cpu")
    assert "made by a replay with interventions (skip:single:1@0-1), which are not applied again, so an " in (
        capsys.readouterr().err
    )


def _pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # said by torch when oneDNN's flags are set
def test_replay_of_one_step_is_the_lens_image_of_the_last_block_at_that_step(models, tmp_path):
    """`replay --step k --until k` saves the x0 estimate of step k: the lens's x0 of the last block. Compared
    exactly, with oneDNN off: its convolutions may pick other kernels for the lens's batch than for one
    image (torch 2.4 on an AVX-512 CPU does), which moves a few JPEG levels."""
    with torch.backends.mkldnn.flags(enabled=False):
        _replay_one_step_against_the_lens(models, tmp_path)


def _replay_one_step_against_the_lens(models, tmp_path):
    last = len(models.flow.single_blocks) - 1
    opts = RunOptions(
        model="flux-tiny",
        prompt="a red cube",
        seed=1,
        width=64,
        height=48,
        output_dir=str(tmp_path / "run"),
        blocks=f"single:{last}",
        decode_target="x0",
    ).validate()
    run = generate(models, opts, progress=False)
    lens = {k: _pixels(run.decoded_dir / f"single_block_{last}_step_{k}.jpg") for k in range(NUM_STEPS)}
    for n, k in enumerate((1, 2)):
        replay_command(str(run.capture_path), step=k, until=k, output_dir=str(tmp_path / "replays"),
                       device="cpu", progress=False)  # fmt: skip
        assert json.loads((tmp_path / "replays" / f"replay_{n}.json").read_text())["replayed_steps"] == [k, k]
        got = _pixels(tmp_path / "replays" / f"replay_{n}.jpg")
        assert np.array_equal(got, lens[k])
        assert not np.array_equal(got, lens[k + 1])  # the images of neighbouring steps differ


def test_replay_and_sweep_read_a_safetensors_capture_like_the_pt_one(models, flow, captures, tmp_path):
    (pt_path, pt), _ = captures
    st_path = _capture(models, tmp_path / "run", format="safetensors")  # the same run: prompt, seed, size
    assert st_path.is_dir()
    st = load_capture(st_path)
    final = pt["denoising_context"]["final_latent"]
    assert torch.equal(st["denoising_context"]["final_latent"], final)
    assert torch.equal(replay(flow, st).latent, final)
    spec = "skip:single:1@0-1;zero:double:0:img@2"
    for name, path in (("pt", pt_path), ("st", st_path)):
        replay_command(str(path), intervention=spec, output_dir=str(tmp_path / name), device="cpu",
                       progress=False)  # fmt: skip
        sweep_command(str(path), "zero", blocks="double:1,single:2", tokens="img",
                      output_dir=str(tmp_path / name / "sweep"), device="cpu", progress=False)  # fmt: skip
    records = [json.loads((tmp_path / name / "replay_0.json").read_text()) for name in ("pt", "st")]
    assert records[0]["vs_stored_final"] == records[1]["vs_stored_final"]
    assert records[0]["vs_stored_final"]["mse"] > 0
    applied = [["skip:single:1@0-1", 0], ["skip:single:1@0-1", 1], ["zero:double:0:img@2", 2]]
    assert records[0]["applied"] == records[1]["applied"] == applied
    assert (tmp_path / "pt" / "replay_0.jpg").read_bytes() == (tmp_path / "st" / "replay_0.jpg").read_bytes()
    sweeps = [tmp_path / name / "sweep" for name in ("pt", "st")]
    assert (sweeps[0] / "sweep.csv").read_text() == (sweeps[1] / "sweep.csv").read_text()
    with open(sweeps[1] / "sweep.csv") as f:
        assert all(float(r["mse"]) > 0 for r in csv.DictReader(f))
    for name in ("unmodified", "double_block_1", "single_block_2"):
        assert (sweeps[0] / f"{name}.jpg").read_bytes() == (sweeps[1] / f"{name}.jpg").read_bytes()


def test_commands_check_their_flags_before_loading_any_model(captures, monkeypatch):
    import flux.sweep

    (path, _), _ = captures

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(flux.sweep, "load_for_replay", no_loading)
    with pytest.raises(UsageError, match="--blocks"):
        sweep_command(str(path), blocks="double:99")
    with pytest.raises(UsageError, match="--steps"):
        sweep_command(str(path), steps="9")
    with pytest.raises(UsageError, match="--step"):
        replay_command(str(path), step=7)
    with pytest.raises(UsageError):
        replay_command(str(path), intervention="skip:triple:0")
    with pytest.raises(UsageError, match="before step 2"):
        replay_command(str(path), step=2, intervention="skip:double:0@1-3")
    with pytest.raises(UsageError, match="none of which this replay runs"):
        replay_command(str(path), until=1, intervention="skip:double:0@3")


def test_a_mismatched_patch_source_is_refused_before_loading(models, captures, tmp_path, monkeypatch):
    import flux.sweep

    (path, _), _ = captures
    other_size = _capture(models, tmp_path / "small", width=48)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the patch source was checked")

    monkeypatch.setattr(flux.sweep, "load_for_replay", no_loading)
    with pytest.raises(UserError, match="same width, height"):
        sweep_command(str(path), intervention="patch", source=str(other_size), blocks="double:0")
    with pytest.raises(UserError, match="same width, height"):
        replay_command(str(path), intervention="patch:double:0", source=str(other_size))


def test_a_patch_source_of_another_model_is_refused_before_loading(captures, tmp_path, monkeypatch):
    """flux-dev and Krea have the same shapes, so only the recorded model name tells their captures apart."""
    import flux.sweep

    (path, capture), _ = captures
    relabelled = {**capture, "metadata": {**capture["metadata"], "model": "flux-dev-krea"}}
    torch.save(relabelled, tmp_path / "krea.pt")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the patch source was checked")

    monkeypatch.setattr(flux.sweep, "load_for_replay", no_loading)
    with pytest.raises(UserError, match="source capture is of flux-dev-krea, this one of flux-tiny"):
        sweep_command(str(path), intervention="patch", source=str(tmp_path / "krea.pt"), blocks="double:0")
    with pytest.raises(UserError, match="source capture is of flux-dev-krea"):
        replay_command(str(path), intervention="patch:double:0", source=str(tmp_path / "krea.pt"))


def test_a_sweep_without_matplotlib_writes_everything_but_the_chart(captures, tmp_path, monkeypatch, capsys):
    import importlib.util

    (path, _), _ = captures
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    sweep_command(str(path), "skip", blocks="single:1-2", output_dir=str(tmp_path / "s"), device="cpu")
    assert "without sweep.png" in capsys.readouterr().err
    written = {p.name for p in (tmp_path / "s").iterdir()}
    assert written == {"sweep.csv", "sweep.json", "contact_sheet.jpg", "unmodified.jpg"} | {
        f"single_block_{i}.jpg" for i in (1, 2)
    }


def test_an_unchanged_image_is_strict_json_with_a_null_psnr(captures, tmp_path):
    (path, _), _ = captures
    sweep_command(str(path), "patch", blocks="single:0", tokens="img", source=str(path),
                  output_dir=str(tmp_path / "same"), device="cpu")  # fmt: skip
    text = (tmp_path / "same" / "sweep.json").read_text()
    row = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))["rows"][0]
    assert row["mse"] == 0 and row["psnr"] is None


def test_a_bad_direction_file_is_a_usage_error_naming_the_flag(captures, tmp_path, monkeypatch):
    import flux.sweep

    (path, _), _ = captures
    (tmp_path / "garbage.pt").write_bytes(b"hello world")
    torch.save(torch.randn(7), tmp_path / "short.pt")
    monkeypatch.setattr(flux.sweep, "load_for_replay", lambda *a: pytest.fail("a model was loaded"))
    for name, message in [
        ("garbage.pt", "is not a readable tensor file"),
        ("short.pt", "does not broadcast"),
        ("absent.pt", "is not a file"),
    ]:
        with pytest.raises(UsageError, match=message):
            replay_command(str(path), intervention="add:double:0*2", direction=str(tmp_path / name))


def test_notebook_mistakes_get_clear_errors(models, captures):
    """What a notebook is likely to pass: a model in another dtype, a path as source, one index or numpy
    indices as steps (fine), a bool (refused)."""
    import flux
    from flux.loading import load_flow_model

    (path, capture), _ = captures
    bf16 = load_flow_model(get_spec("flux-tiny"), "cpu", torch.bfloat16)
    with pytest.raises(UserError, match="load it in the capture's dtype"):
        replay(bf16, capture)
    assert Intervention("patch", "double", 0, source=str(path)).source["metadata"] == capture["metadata"]
    assert Intervention("skip", "double", 0, steps=0).steps == (0,)
    assert Intervention("skip", "double", 0, steps=np.arange(2)).steps == (0, 1)
    with pytest.raises(UsageError, match=r"steps \(e.g. \(0, 1\), or None for all\) must be an index"):
        Intervention("skip", "double", 0, steps=True)
    assert Intervention("skip", "double", 0, steps=[1, 0]).steps == (1, 0)
    with pytest.raises(UsageError, match="'double' and/or 'single'"):
        flux.decode.lens_plan(capture, blocks={"singel": [0]})


def test_a_bare_import_flux_reaches_the_submodules():
    import subprocess
    import sys

    code = "import flux; print(flux.decode.lens_plan.__name__, flux.interventions.replay.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["lens_plan", "replay"], out.stderr


def test_an_fn_intervention_is_any_change_and_sees_the_step(flow, captures):
    (_, cap), _ = captures
    direction = torch.randn(flow.hidden_size, generator=torch.Generator().manual_seed(5))
    add = replay(
        flow, cap, interventions=[Intervention("add", "double", 1, (1, 2), scale=2.0, direction=direction)]
    )
    seen = []

    def shift(img, txt, step):
        seen.append(step)
        return img + 2.0 * direction, txt

    fn = replay(flow, cap, interventions=[Intervention("fn", "double", 1, (1, 2), fn=shift)])
    assert seen == [1, 2] and torch.equal(fn.latent, add.latent)  # the same change as add, bit for bit
    same = replay(
        flow, cap, interventions=[Intervention("fn", "single", 2, fn=lambda img, txt, k: (img, txt))]
    )
    assert torch.equal(same.latent, cap["denoising_context"]["final_latent"])
    with pytest.raises(UsageError, match="KIND is skip, zero, patch or add"):  # no function on a command line
        parse_interventions("fn:double:0", 2, 3, 4)
    with pytest.raises(UsageError, match="Python only"):
        Intervention("fn", "double", 0)
    with pytest.raises(UserError, match="fn must return"):
        replay(
            flow,
            cap,
            interventions=[Intervention("fn", "double", 0, fn=lambda img, txt, k: (img[:, :1], txt))],
        )
    for wrong, what in ((lambda img, txt, k: img, "Tensor"), (lambda img, txt, k: None, "NoneType")):
        with pytest.raises(
            UserError, match=f"fn must return the pair \\(img, txt\\) of tensors; it returned {what}"
        ):
            replay(flow, cap, interventions=[Intervention("fn", "double", 0, fn=wrong)])


def test_replaying_on_another_machine_says_it_may_differ(captures, tmp_path, capsys):
    from flux.sweep import open_for_replay

    (path, _), _ = captures
    open_for_replay(str(path), "cpu")
    assert "may differ" not in capsys.readouterr().err  # the machine that made it
    capture = torch.load(path, weights_only=True)
    capture["metadata"]["device_name"] = "another machine"
    torch.save(capture, tmp_path / "elsewhere.pt")
    open_for_replay(str(tmp_path / "elsewhere.pt"), "cpu")
    assert f"ran on cpu (another machine) in float32; replaying on cpu ({platform.machine()})" in (
        capsys.readouterr().err
    )


def test_a_direction_may_be_given_as_a_path_as_a_source_may(flow, captures, tmp_path):
    (_, cap), _ = captures
    direction = torch.linspace(-1, 1, flow.hidden_size)
    torch.save(direction, tmp_path / "d.pt")
    by_path = Intervention("add", "double", 1, (0,), scale=2.0, direction=str(tmp_path / "d.pt"))
    assert torch.equal(by_path.direction, direction)
    by_tensor = Intervention("add", "double", 1, (0,), scale=2.0, direction=direction)
    assert torch.equal(replay(flow, cap, interventions=[by_path]).latent,
                       replay(flow, cap, interventions=[by_tensor]).latent)  # fmt: skip


def test_the_sweep_chart_marks_an_unchanged_image_above_the_rest_not_as_zero(tmp_path):
    from flux.sweep import write_chart

    image = Image.new("RGB", (8, 8))
    rows = [
        SweepRow("skip:double:0@all", "double", 0, 0.01, 20.0, 0.5, 0.3, image),
        SweepRow("skip:double:1@all", "double", 1, 0.0, math.inf, 1.0, 0.0, image),  # unchanged
        SweepRow("skip:single:0@all", "single", 0, 0.001, 30.0, 0.9, 0.2, image),
    ]
    fig = write_chart(rows, tmp_path / "sweep.png", "title")
    # The top panel: pixel MSE per block, in block order (not the latent MSE, nor ranked).
    assert [b.get_height() for b in fig.axes[0].patches] == [0.01, 0.0, 0.001]
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["d0", "d1", "s0"]
    bars = fig.axes[1].patches
    assert [b.get_height() for b in bars] == [20.0, 33.0, 30.0]  # 1.1 x the highest finite PSNR
    assert [b.get_hatch() for b in bars] == [None, "//", None]
    assert [t.get_text() for t in fig.axes[1].texts] == ["∞"]
    with Image.open(tmp_path / "sweep.png") as png:
        assert png.format == "PNG"


def test_save_capture_that_host_memory_cannot_hold_is_refused_before_loading(captures, tmp_path, monkeypatch):
    import flux.options
    import flux.sweep

    (path, _), _ = captures
    monkeypatch.setattr(flux.sweep, "load_for_replay", lambda *a, **k: pytest.fail("loaded"))
    # Every block output of the 3 steps from step 1: 5 blocks x (12 image + 32 text tokens) x 64 floats.
    held = 3 * 5 * (12 + 32) * 64 * 4
    models = flux.options.model_host_bytes(get_spec("flux-tiny"))  # on the CPU, beside the capture
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: models + int(held / 0.8) - 1)
    with pytest.raises(UserError, match="--save_capture keeps every block output of the 3 replayed steps"):
        replay_command(str(path), step=1, save_capture=True, output_dir=str(tmp_path), device="cpu")
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: models + int(held / 0.8) + 1)
    with pytest.raises(pytest.fail.Exception, match="loaded"):  # past the check, to the loading
        replay_command(str(path), step=1, save_capture=True, output_dir=str(tmp_path), device="cpu")


def test_offload_sweeps_and_replays_give_the_same_results(captures, tmp_path, monkeypatch):
    """With --offload the flow model stays in host memory and visits the device for the replays: the same
    rows and images (on the CPU the visit is no move at all, but the whole path runs). A sweep's blocks
    share a visit: one for the unmodified reference, one for both blocks."""
    import flux.pipeline

    real_visiting, visits = flux.pipeline.visiting, []

    def counted_visiting(module, device):
        visit = real_visiting(module, device)
        return lambda: visits.append(1) or visit()

    monkeypatch.setattr(flux.pipeline, "visiting", counted_visiting)
    (path, _), _ = captures
    flags = {"blocks": "double:1,single:2", "steps": "2-3", "device": "cpu", "progress": False}
    for offload in (False, True):
        sweep_command(
            str(path), "skip", output_dir=str(tmp_path / f"sweep_{offload}"), offload=offload, **flags
        )
        assert len(visits) == (2 if offload else 0)
        out = str(tmp_path / f"replay_{offload}")
        replay_command(str(path), intervention="skip:double:1@2", output_dir=out, device="cpu",
                       offload=offload, progress=False)  # fmt: skip
        assert len(visits) == (3 if offload else 0)
        visits.clear()
    rows = [json.loads((tmp_path / f"sweep_{o}" / "sweep.json").read_text())["rows"] for o in (False, True)]
    assert rows[0] == rows[1]
    images = [(tmp_path / f"replay_{o}" / "replay_0.jpg").read_bytes() for o in (False, True)]
    assert images[0] == images[1]


def test_a_visiting_module_comes_back_to_the_tensors_it_held():
    from flux.pipeline import visiting

    module = torch.nn.Linear(4, 4)
    held = {n: t.data_ptr() for n, t in module.named_parameters()}
    visit = visiting(module, torch.device("cpu"))
    with visit():
        module.to(torch.bfloat16)  # stands in for the move to the GPU: new tensors
        assert {n: t.data_ptr() for n, t in module.named_parameters()} != held
    assert {n: t.data_ptr() for n, t in module.named_parameters()} == held
    assert all(t.dtype == torch.float32 for t in module.parameters())
