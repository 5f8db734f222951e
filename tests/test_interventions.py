"""Replays and interventions on flux-tiny captures, on the CPU in float32 (exact)."""

import csv
import json
import math

import pytest
import torch
from PIL import Image

from flux.capture import CapturePlan
from flux.configs import get_spec
from flux.errors import UsageError, UserError
from flux.interventions import Intervener, Intervention, parse_interventions, parse_steps, replay
from flux.pipeline import RunOptions, generate, load_models
from flux.store import load_capture
from flux.sweep import psnr, replay_command, ssim, sweep_command

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


def test_replay_from_a_later_step_and_a_single_step(flow, captures):
    (_, cap), _ = captures
    ctx = cap["denoising_context"]
    late = replay(flow, cap, start=2, record=_everything(flow))
    assert torch.equal(late.latent, ctx["final_latent"])
    assert late.capture["metadata"]["captured_steps"] == [2, 3]
    assert torch.equal(late.capture["single_blocks"]["block_2"][0], _stored(cap, "single", 2, 2))
    one = replay(flow, cap, start=1, stop=1)
    assert torch.equal(one.latent, ctx["img_state"][2])
    t = ctx["timestep_pairs"][3][0]  # at the last step x0 is the latent the sampler steps to (t_prev = 0)
    last = replay(flow, cap, start=3)
    assert torch.equal(last.x0, last.latent) and t > 0


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


def test_patch_needs_matching_shapes(models, flow, captures, tmp_path):
    (_, cap), _ = captures
    small = load_capture(_capture(models, tmp_path, width=128))
    with pytest.raises(UserError, match="same model at the same width, height"):
        replay(flow, cap, interventions=[Intervention("patch", "double", 0, (0,), source=small)])
    assert _no_hooks(flow)


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
def test_scores_match_their_formulas():
    a = torch.full((1, 3, 16, 16), 0.5)
    b = torch.full((1, 3, 16, 16), 0.6)
    assert math.isclose(float(psnr(a, b)[0]), 20.0, rel_tol=1e-5)  # MSE 0.01 -> 10 log10(100)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2))
    # Constant images: variance and covariance are zero, so SSIM is the luminance term alone.
    c1 = 0.01**2
    assert math.isclose(float(ssim(a, b)[0]), (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1), rel_tol=1e-5)


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
    with Image.open(out / "contact_sheet.jpg") as sheet:
        assert sheet.format == "JPEG" and sheet.width > 0
    record = json.loads((out / "sweep.json").read_text())
    assert {r["intervention"] for r in record["rows"]} == {r["intervention"] for r in rows}
    assert "skip:double:0@all" in {r["intervention"] for r in rows}
    assert (out / "single_block_2.jpg").is_file()


def test_sweep_of_patches_from_the_same_capture_changes_nothing(captures, tmp_path):
    (path, _), _ = captures
    sweep_command(str(path), "patch", blocks="single:0-1", steps="1", tokens="img", source=str(path),
                  output_dir=str(tmp_path / "patch"), device="cpu")  # fmt: skip
    with open(tmp_path / "patch" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["mse"]) for r in rows] == [0.0, 0.0]
    assert {r["intervention"] for r in rows} == {"patch:single:0:img@1", "patch:single:1:img@1"}


def test_sweep_usage_errors(captures):
    (path, _), _ = captures
    with pytest.raises(UsageError, match="--source"):
        sweep_command(str(path), "patch")
    with pytest.raises(UsageError, match="one of skip"):
        sweep_command(str(path), "delete")


def test_replay_command_records_its_interventions(captures, tmp_path):
    (path, cap), _ = captures
    replay_command(str(path), intervention="skip:single:1@0-1", output_dir=str(tmp_path), save_capture=True,
                   device="cpu")  # fmt: skip
    record = json.loads((tmp_path / "replay_0.json").read_text())
    assert record["interventions"] == ["skip:single:1@0-1"]
    assert record["vs_stored_final"]["mse"] > 0
    with Image.open(tmp_path / "replay_0.jpg") as img:
        assert img.size == (cap["metadata"]["width"], cap["metadata"]["height"])
    saved = load_capture(tmp_path / "replay_0.pt")
    assert saved["metadata"]["interventions"] == ["skip:single:1@0-1"]
    assert torch.equal(saved["double_blocks"]["block_1"][0][0], _stored(cap, "double", 1, 0)[0])
    replay_command(str(path), output_dir=str(tmp_path), device="cpu")
    assert json.loads((tmp_path / "replay_1.json").read_text())["vs_stored_final"]["mse"] == 0.0


def test_commands_check_their_flags_before_loading_any_model(captures, monkeypatch):
    import flux.sweep

    (path, _), _ = captures

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(flux.sweep, "_load", no_loading)
    with pytest.raises(UsageError, match="--blocks"):
        sweep_command(str(path), blocks="double:99")
    with pytest.raises(UsageError, match="--steps"):
        sweep_command(str(path), steps="9")
    with pytest.raises(UsageError, match="--step"):
        replay_command(str(path), step=7)
    with pytest.raises(UsageError):
        replay_command(str(path), intervention="skip:triple:0")


def test_a_mismatched_patch_source_is_refused_before_loading(models, captures, tmp_path, monkeypatch):
    import flux.sweep

    (path, _), _ = captures
    other_size = _capture(models, tmp_path / "small", width=48)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the patch source was checked")

    monkeypatch.setattr(flux.sweep, "_load", no_loading)
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

    monkeypatch.setattr(flux.sweep, "_load", no_loading)
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
    monkeypatch.setattr(flux.sweep, "_load", lambda *a: pytest.fail("a model was loaded"))
    for name, message in [
        ("garbage.pt", "is not a readable tensor file"),
        ("short.pt", "does not broadcast"),
        ("absent.pt", "is not a file"),
    ]:
        with pytest.raises(UsageError, match=message):
            replay_command(str(path), intervention="add:double:0*2", direction=str(tmp_path / name))


def test_notebook_mistakes_get_clear_errors(models, captures):
    """What a notebook is likely to pass: a model in another dtype, a path as source, an int as steps."""
    import flux
    from flux.loading import load_flow_model

    (path, capture), _ = captures
    bf16 = load_flow_model(get_spec("flux-tiny"), "cpu", torch.bfloat16)
    with pytest.raises(UserError, match="load it in the capture's dtype"):
        replay(bf16, capture)
    assert Intervention("patch", "double", 0, source=str(path)).source["metadata"] == capture["metadata"]
    with pytest.raises(UsageError, match="steps must be step indices"):
        Intervention("skip", "double", 0, steps=0)
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
