"""capture_sample.py end to end on flux-tiny (CPU): files, format, observation only, decode later, errors."""

import importlib
import inspect
import json
import operator
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import capture_sample  # noqa: E402
from flux import load_capture  # noqa: E402
from flux.configs import TINY_PARAMS, get_spec  # noqa: E402
from flux.errors import UserError  # noqa: E402

SIZE = ["--width", "64", "--height", "48"]  # 4x3 = 12 image tokens
T = 32  # flux-tiny's T5 length
L = 12
D = TINY_PARAMS.hidden_size


def cli(*args: str) -> int:
    return capture_sample.run([*args, "--progress", "False"])


@pytest.fixture
def roomy_machine(monkeypatch):
    """Validation on a disk and in a host memory that hold any capture. A published model's capture at the
    default 256 px takes 0.7 GB (flux-schnell) to 13 GB (flux-dev) of disk and, as a .pt, of the memory
    left beside its 34 GB of models: real figures would pass or fail these tests by the machine (and on a
    shared one, by the moment). The checks themselves are tested with given figures."""
    import shutil

    import flux.options

    real = shutil.disk_usage
    monkeypatch.setattr(flux.options.shutil, "disk_usage", lambda path: real(path)._replace(free=2**60))
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: 2**60)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = cli("--model", "flux-tiny", "--prompt", "a red cube", "--seed", "1", *SIZE, "--output_dir", str(out))
    assert rc == 0
    return out


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_writes_the_three_documented_files(tiny_run):
    assert (tiny_run / "img_0.jpg").is_file()
    pt = _only(tiny_run / "intermediates", "capture_*_flux-tiny.pt")
    meta = _only(tiny_run / "intermediates", "metadata_*_flux-tiny.json")
    assert meta.name == "metadata_" + pt.name.removeprefix("capture_").removesuffix(".pt") + ".json"
    assert Image.open(tiny_run / "img_0.jpg").size == (64, 48)
    data = json.loads(meta.read_text())
    assert data["seed"] == 1 and data["model"] == "flux-tiny" and data["complete"] is True
    assert data["guidance"] == 3.5 and data["guidance_used"] is True  # tiny has dev's guidance input
    assert data["files"]["image"].endswith("img_0.jpg")
    assert data["flags"]["prompt"] == "a red cube"
    assert (data["txt_seq_len"], data["img_seq_len"]) == (T, L)  # 32 T5 tokens; (48 / 16) x (64 / 16)


def test_pt_loads_with_default_torch_load_in_documented_structure(tiny_run):
    pt = _only(tiny_run / "intermediates", "capture_*_flux-tiny.pt")
    capture = torch.load(pt, weights_only=True)  # the default from torch 2.6 on
    assert set(capture) == {"double_blocks", "single_blocks", "denoising_context", "metadata"}
    steps = capture["metadata"]["num_steps"]
    assert steps == 4 and len(capture["metadata"]["timesteps"]) == steps + 1
    assert list(capture["double_blocks"]) == [f"block_{i}" for i in range(TINY_PARAMS.depth)]
    assert list(capture["single_blocks"]) == [f"block_{i}" for i in range(TINY_PARAMS.depth_single_blocks)]
    for entries in capture["double_blocks"].values():
        assert len(entries) == steps
        for img, txt in entries:
            assert img.shape == (1, L, D) and txt.shape == (1, T, D)
    for entries in capture["single_blocks"].values():
        assert len(entries) == steps and all(x.shape == (1, T + L, D) for x in entries)
    ctx = capture["denoising_context"]
    assert len(ctx["img_state"]) == steps and ctx["img_state"][0].shape == (1, L, 64)
    assert len(ctx["vec"]) == steps and ctx["vec"][0].shape == (1, D)
    assert ctx["txt"].shape == (1, T, TINY_PARAMS.context_in_dim) and ctx["y"].shape == (
        1,
        TINY_PARAMS.vec_in_dim,
    )
    assert ctx["txt_seq_len"] == T and ctx["guidance"] == 3.5
    assert ctx["timestep_pairs"] == list(
        zip(capture["metadata"]["timesteps"][:-1], capture["metadata"]["timesteps"][1:])
    )
    assert ctx["final_latent"].shape == (1, L, 64)
    assert ctx["img_ids"].shape == (1, L, 3) and ctx["txt_ids"].shape == (1, T, 3)


def test_lens_files_match_captured_blocks_and_steps(tiny_run):
    decoded = _only(tiny_run / "intermediates" / "decoded", "capture_*")
    expected = {f"double_block_{i}_step_{k}.jpg" for i in range(2) for k in range(4)}
    expected |= {f"single_block_{i}_step_{k}.jpg" for i in range(3) for k in range(4)}
    expected |= {"grid_double.jpg", "grid_single.jpg"}
    assert {p.name for p in decoded.iterdir()} == expected


def test_decode_later_equals_decode_at_capture(tiny_run, tmp_path):
    pt = _only(tiny_run / "intermediates", "capture_*_flux-tiny.pt")
    at_capture = _only(tiny_run / "intermediates" / "decoded", "capture_*")
    assert capture_sample.run(["decode", str(pt), "--output_dir", str(tmp_path / "later")]) == 0
    later = sorted((tmp_path / "later").iterdir())
    assert [p.name for p in later] == sorted(p.name for p in at_capture.iterdir())
    for p in later:
        assert p.read_bytes() == (at_capture / p.name).read_bytes(), p.name


def test_decode_picks_blocks_and_steps(tiny_run, tmp_path, monkeypatch, capsys):
    import flux.decode

    pt = str(_only(tiny_run / "intermediates", "capture_*_flux-tiny.pt"))
    at_capture = _only(tiny_run / "intermediates" / "decoded", "capture_*")
    out = tmp_path / "some"
    argv = ["decode", pt, "--blocks", "double:1,single:0-1", "--steps", "0,3", "--output_dir", str(out)]
    assert capture_sample.run([*argv, "--progress", "False"]) == 0
    wanted = [
        f"{s}_block_{i}_step_{k}.jpg"
        for s, i in [("double", 1), ("single", 0), ("single", 1)]
        for k in (0, 3)
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted([*wanted, "grid_double.jpg", "grid_single.jpg"])
    for name in wanted:  # the same images as the whole lens's
        assert (out / name).read_bytes() == (at_capture / name).read_bytes(), name
    monkeypatch.setattr(flux.decode, "load_model_final_layer", lambda *a, **k: pytest.fail("loaded"))
    assert (
        capture_sample.run(["decode", pt, "--blocks", "single:7", "--output_dir", str(tmp_path / "x")]) == 2
    )
    assert "--blocks" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_subcommands_write_beside_the_capture_by_default(tiny_run, tmp_path, capfd):
    import shutil

    pt = shutil.copy(_only(tiny_run / "intermediates", "capture_*_flux-tiny.pt"), tmp_path)
    stem = Path(pt).stem
    for _ in range(2):  # the second decode must not touch the first's folder
        assert capture_sample.run(["decode", pt, "--progress", "False"]) == 0
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir()) == [stem, f"{stem}_1"]
    assert (tmp_path / "decoded" / stem / "single_block_2_step_3.jpg").is_file()
    assert capture_sample.run(["replay", pt, "--step", "3", "--until", "3", "--progress", "False"]) == 0
    assert sorted(p.name for p in (tmp_path / "replays").iterdir()) == ["replay_0.jpg", "replay_0.json"]
    sweep = ["sweep", pt, "--blocks", "double:0", "--steps", "3", "--progress", "False"]
    assert capture_sample.run(sweep) == 0
    assert [p.name for p in (tmp_path / "sweeps").iterdir()] == [f"{stem}_skip_steps3"]
    assert (tmp_path / "sweeps" / f"{stem}_skip_steps3" / "sweep.csv").is_file()
    sweep = [
        "sweep",
        pt,
        "--intervention",
        "zero",
        "--tokens",
        "img",
        "--blocks",
        "double:0",
        "--steps",
        "2-3",
    ]
    assert capture_sample.run([*sweep, "--progress", "False"]) == 0
    assert (tmp_path / "sweeps" / f"{stem}_zero_img_steps2-3" / "sweep.csv").is_file()  # the README's name
    assert "%|" not in capfd.readouterr().err  # --progress False: no progress bar from any of them


def test_subcommands_run_from_inside_a_safetensors_capture_write_beside_it(tmp_path, monkeypatch):
    """`decode .` from inside a capture folder means that capture: its outputs go beside it, as for its
    path, never into the capture itself."""
    assert cli("--model", "flux-tiny", *SIZE, "--num_steps", "2", "--format", "safetensors",
               "--should_decode_intermediates", "False", "--output_dir", str(tmp_path)) == 0  # fmt: skip
    capture = _only(tmp_path / "intermediates", "capture_*")
    inside = sorted(p.name for p in capture.iterdir())
    monkeypatch.chdir(capture)
    assert capture_sample.run(["decode", ".", "--progress", "False"]) == 0
    assert capture_sample.run(["analyze", ".", "--animation", "False", "--progress", "False"]) == 0
    assert (
        capture_sample.run(["sweep", ".", "--blocks", "double:0", "--steps", "1", "--progress", "False"]) == 0
    )
    assert capture_sample.run(["replay", ".", "--step", "1", "--progress", "False"]) == 0
    assert sorted(p.name for p in capture.iterdir()) == inside
    intermediates = tmp_path / "intermediates"
    assert [p.name for p in (intermediates / "decoded").iterdir()] == [capture.name]
    assert [p.name for p in (intermediates / "analysis").iterdir()] == [capture.name]
    assert [p.name for p in (intermediates / "sweeps").iterdir()] == [f"{capture.name}_skip_steps1"]
    assert sorted(p.name for p in (intermediates / "replays").iterdir()) == ["replay_0.jpg", "replay_0.json"]


def test_a_plain_run_with_a_random_seed_prints_it_to_be_repeated(tmp_path, capsys):
    """--capture False writes no metadata, so the seed it drew is printed instead: passing it back gives
    the same image."""
    plain = ["--model", "flux-tiny", *SIZE, "--capture", "False"]
    assert cli(*plain, "--output_dir", str(tmp_path / "a")) == 0
    seeds = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("Seed:")]
    assert len(seeds) == 1 and seeds[0].isdigit()
    assert cli(*plain, "--seed", seeds[0], "--output_dir", str(tmp_path / "b")) == 0
    assert "Seed:" not in capsys.readouterr().out  # given, so known
    assert (tmp_path / "a" / "img_0.jpg").read_bytes() == (tmp_path / "b" / "img_0.jpg").read_bytes()


def test_capture_is_observation_only_and_runs_are_deterministic(tiny_run, tmp_path):
    base = ["--model", "flux-tiny", "--prompt", "a red cube", "--seed", "1", *SIZE]
    assert cli(*base, "--capture", "False", "--output_dir", str(tmp_path / "plain")) == 0
    assert (tmp_path / "plain" / "img_0.jpg").read_bytes() == (tiny_run / "img_0.jpg").read_bytes()
    assert not (tmp_path / "plain" / "intermediates").exists()
    # Same seed again: byte-identical image and identical capture tensors.
    assert cli(*base, "--should_decode_intermediates", "False", "--output_dir", str(tmp_path / "again")) == 0
    assert (tmp_path / "again" / "img_0.jpg").read_bytes() == (tiny_run / "img_0.jpg").read_bytes()
    a = load_capture(_only(tiny_run / "intermediates", "capture_*.pt"))
    b = load_capture(_only(tmp_path / "again" / "intermediates", "capture_*.pt"))
    for name, entries in a["single_blocks"].items():
        assert all(torch.equal(x, y) for x, y in zip(entries, b["single_blocks"][name]))
    assert torch.equal(a["denoising_context"]["final_latent"], b["denoising_context"]["final_latent"])


def test_second_run_in_same_folder_never_overwrites(tiny_run, tmp_path):
    out = tmp_path / "twice"
    base = ["--model", "flux-tiny", "--prompt", "a", "--seed", "2", *SIZE, "--output_dir", str(out)]
    assert cli(*base, "--should_decode_intermediates", "False") == 0
    assert cli(*base, "--should_decode_intermediates", "False") == 0
    assert sorted(p.name for p in out.glob("img_*.jpg")) == ["img_0.jpg", "img_1.jpg"]
    assert len(list((out / "intermediates").glob("capture_*.pt"))) == 2
    assert len(list((out / "intermediates").glob("metadata_*.json"))) == 2


def test_safetensors_capture_matches_pt(tiny_run, tmp_path):
    args = ["--model", "flux-tiny", "--prompt", "a red cube", "--seed", "1", *SIZE]
    assert cli(*args, "--format", "safetensors", "--should_decode_intermediates", "False",
               "--output_dir", str(tmp_path)) == 0  # fmt: skip
    directory = _only(tmp_path / "intermediates", "capture_*_flux-tiny")
    assert (directory / "index.json").is_file() and len(list(directory.glob("step_*.safetensors"))) == 4
    a = load_capture(_only(tiny_run / "intermediates", "capture_*.pt"))
    b = load_capture(directory)
    for name, entries in a["double_blocks"].items():
        for (ai, at), (bi, bt) in zip(entries, b["double_blocks"][name]):
            assert torch.equal(ai, bi) and torch.equal(at, bt)
    assert torch.equal(a["denoising_context"]["final_latent"], b["denoising_context"]["final_latent"])
    pairs = a["denoising_context"]["timestep_pairs"]
    assert b["denoising_context"]["timestep_pairs"] == pairs and {type(p) for p in pairs} == {tuple}
    assert (tmp_path / "img_0.jpg").read_bytes() == (tiny_run / "img_0.jpg").read_bytes()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--model", "flux-huge"], "--model"),
        (["--width", "100"], "--width"),
        (["--height", "-16"], "--height"),
        (["--width", "1e9"], "--width"),
        (["--num_steps", "0"], "--num_steps"),
        (["--seed", "abc"], "--seed"),
        (["--prompt", "  "], "--prompt"),  # a number is a fine prompt; blank is not
        (["--decode_target", "x1"], "--decode_target"),
        (["--blocks", "double:99"], "--blocks"),
        (["--steps", "3-1"], "--steps: '3-1' is an empty range (it ends before it starts)"),
        (["--steps", "0-3:0"], "--steps: '0-3:0' has a stride of 0"),
        (["--format", "npz"], "--format"),
        (["--streams", "image"], "--streams"),
        (["--capture_dtype", "int8"], "--capture_dtype"),
        (["--device", "meta"], "--device meta holds no data"),
        (["--device", "xpu"], "--device xpu: this PyTorch or machine cannot use it"),  # a CPU-only build
        # Flags the run would ignore: its metadata would record them as if they had applied.
        (["--capture", "False", "--format", "safetensors"], "--format applies only to a capture"),
        (["--nocapture", "--blocks", "double:0"], "--blocks applies only to a capture"),
        (["--capture", "False", "--steps", "0"], "--steps applies only to a capture"),
        (["--capture", "False", "--streams", "img"], "--streams applies only to a capture"),
        (["--capture", "False", "--capture_dtype", "fp16"], "--capture_dtype applies only to a capture"),
        (["--capture", "False", "--force"], "--force applies only to a capture"),
        (["--capture", "False", "--decode_target", "next"], "--decode_target applies only to a capture"),
        (
            ["--should_decode_intermediates", "False", "--decode_batch_size", "4"],
            "--decode_batch_size applies only to the lens",
        ),
        (
            ["--noshould_decode_intermediates", "--compile_decoder"],
            "--compile_decoder applies only to the lens",
        ),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(args, flag, tmp_path, capsys):
    out = tmp_path / "never"
    rc = (
        cli("--model", "flux-tiny", "--output_dir", str(out), *args)
        if args[0] != "--model"
        else cli(*args, "--output_dir", str(out))
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: ") and flag in err[-1]
    assert not out.exists()


def test_a_prompt_without_its_flag_is_pointed_to_prompt(capsys):
    assert capture_sample.run(["a red cat", "--progress", "False"]) == 2  # Fire reads it as --model
    err = capsys.readouterr().err
    assert "--model 'a red cat' is not known" in err and "give a prompt as --prompt 'a red cat'." in err
    assert capture_sample.run(["--model", "schnell"]) == 2  # a misspelt model name gets no such hint
    assert "--prompt" not in capsys.readouterr().err


def test_a_capture_passed_to_the_main_command_is_pointed_to_the_subcommands(tiny_run, capsys):
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    assert capture_sample.run([pt]) == 2  # Fire reads it as --model
    assert f"To work on a saved capture, name a subcommand: `capture_sample.py decode {pt}`." in (
        capsys.readouterr().err
    )


def test_capture_flags_at_their_defaults_pass_without_a_capture(tmp_path):
    """Only a value the run would ignore is refused: the defaults, spelled out (`auto` included), are not."""
    from flux.options import RunOptions

    at = {"model": "flux-tiny", "output_dir": str(tmp_path), "device": "cpu"}
    RunOptions(**at, capture=False, format="pt", streams="both", capture_dtype="auto", decode_target="x0",
               force=False).validate()  # fmt: skip
    RunOptions(**at, should_decode_intermediates=False, format="safetensors", steps="0").validate()


@pytest.mark.parametrize("flag", ["width", "height"])
def test_sides_go_up_to_4096_pixels(flag, tmp_path):
    from flux.options import RunOptions, UsageError

    def options(side: int) -> RunOptions:
        sizes = {"width": 16, "height": 16, flag: side}
        return RunOptions(model="flux-tiny", output_dir=str(tmp_path), device="cpu", **sizes).validate()

    assert (options(4096).width, options(4096).height) == ((4096, 16) if flag == "width" else (16, 4096))
    with pytest.raises(UsageError, match=f"--{flag} must be a positive multiple of 16 up to 4096; got 4112. "
                                         "Try 4096."):  # fmt: skip
        options(4112)


def test_guidance_on_schnell_warns_before_loading(tmp_path, monkeypatch, capsys, roomy_machine):
    import flux.pipeline

    def stop(*args, **kwargs):
        raise capture_sample.UsageError("stopped where the models would load")

    monkeypatch.setattr(flux.pipeline, "load_models", stop)
    assert cli("--guidance", "4", "--device", "cpu", "--output_dir", str(tmp_path)) == 2
    err = capsys.readouterr().err
    warning = "warning: flux-schnell has no guidance input; --guidance 4 is ignored."
    assert warning in err and err.index(warning) < err.index("stopped where the models would load")


def test_offload_on_the_cpu_loads_on_the_cpu_and_says_so(tmp_path, monkeypatch, capsys):
    """--offload moves each model to the GPU while it runs; on the CPU there is nowhere to move them to."""
    import flux.pipeline

    def stop(*args, **kwargs):
        raise capture_sample.UsageError("stopped where the models would load")

    monkeypatch.setattr(flux.pipeline, "load_models", stop)
    assert cli("--model", "flux-tiny", "--offload", "--device", "cpu", "--output_dir", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Loading flux-tiny (flow model, autoencoder, T5, CLIP) on cpu..." in err and "moved to" not in err


@pytest.mark.parametrize(
    ("total_gb", "offload", "refused"),
    [
        (80, False, None),  # an H100: all of flux-schnell's 33.9 GB of weights at once
        (24, False, "Pass --offload"),  # an RTX 4090: not all at once...
        (24, True, None),  # ...but the 23.8 GB flow model alone
        (16, True, "cannot run on this GPU, even with --offload"),
    ],
)
def test_models_that_cannot_fit_the_gpu_are_refused_before_loading(total_gb, offload, refused, monkeypatch):
    import flux.options

    # Weights as loaded: 11,891,178,560 flow parameters in bf16, 83,819,683 AE parameters in float32, and
    # T5-XXL + CLIP-L in bf16 (9.8 GB).
    assert sum(flux.options.model_bytes(get_spec("flux-schnell")).values()) == 2 * 11_891_178_560 + (
        4 * 83_819_683 + 9_800_000_000
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, int(total_gb * 1e9)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a test GPU")
    check = lambda: flux.options.check_gpu_fits(get_spec("flux-schnell"), torch.device("cuda"), offload)
    if refused is None:
        check()
    else:
        with pytest.raises(UserError, match=refused):
            check()
    flux.options.check_gpu_fits(get_spec("flux-schnell"), torch.device("cpu"), False)  # a CPU: no check


@pytest.mark.parametrize(("total_gb", "refused"), [(25.7, False), (24.0, True)])  # 24 GiB; 24 GB
def test_a_replay_the_gpu_cannot_hold_is_refused_before_loading(
    total_gb, refused, tiny_run, monkeypatch, capsys
):
    """flux-schnell's flow model (23.78 GB) and AE (0.34 GB) together, as replay and sweep hold them."""
    import flux.configs
    import flux.sweep

    capture = torch.load(_only(tiny_run / "intermediates", "capture_*.pt"), weights_only=True)
    capture["metadata"]["model"] = "flux-schnell"  # sized as the published model; nothing is loaded
    torch.save(capture, tiny_run.parent / f"schnell_{total_gb}.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, int(total_gb * 1e9)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a test GPU")
    monkeypatch.setattr(flux.sweep, "load_for_replay", lambda *a, **k: pytest.fail("loaded"))
    if refused:
        with pytest.raises(
            UserError, match=r"together, 24\.1 GB, more than this GPU's 24\.0 GB \(a test GPU\)"
        ):
            flux.sweep.open_for_replay(str(tiny_run.parent / f"schnell_{total_gb}.pt"), "cuda")
    else:
        flux.sweep.open_for_replay(str(tiny_run.parent / f"schnell_{total_gb}.pt"), "cuda")


def test_fp16_capture_of_a_published_model_warns_of_overflow(tmp_path, roomy_machine):
    from flux.options import RunOptions

    def warnings(model, dtype):
        opts = RunOptions(model=model, capture_dtype=dtype, output_dir=str(tmp_path), device="cpu")
        return [w for w in opts.validate().warnings if "65504" in w]

    assert len(warnings("flux-schnell", "fp16")) == 1 and len(warnings("flux-dev", "fp16")) == 1
    assert "stored as inf" in warnings("flux-schnell", "fp16")[0]
    # bf16 (the default) holds the range; flux-tiny's small activations fit fp16.
    assert warnings("flux-schnell", "bf16") == warnings("flux-schnell", None) == []
    assert warnings("flux-tiny", "fp16") == []


@pytest.mark.parametrize(
    ("model", "steps", "t5_tokens", "guidance", "shift", "repo", "flow"),
    [  # ../shared/flux_reference.md: the reference CLI's defaults and the hub's repos and file names
        ("flux-schnell", 4, 256, None, False, "FLUX.1-schnell", "flux1-schnell.safetensors"),
        ("flux-dev", 50, 512, 2.5, True, "FLUX.1-dev", "flux1-dev.safetensors"),
        ("flux-dev-krea", 50, 512, 2.5, True, "FLUX.1-Krea-dev", "flux1-krea-dev.safetensors"),
    ],
)
def test_each_published_model_runs_with_the_reference_defaults(
    model, steps, t5_tokens, guidance, shift, repo, flow, tmp_path, roomy_machine
):
    from flux.configs import get_spec
    from flux.pipeline import RunOptions

    spec = get_spec(model)
    opts = RunOptions(model=model, output_dir=str(tmp_path), device="cpu").validate()
    assert opts.num_steps == steps and spec.t5_max_length == t5_tokens and spec.shift_schedule is shift
    assert spec.uses_guidance is (guidance is not None)
    if guidance is not None:
        assert opts.guidance == guidance
    assert spec.text_repo_id == "black-forest-labs/FLUX.1-schnell"  # T5 and CLIP for all three
    assert spec.clip_max_length == 77  # the reference's CLIP context, for all three
    assert (spec.gated, spec.repo_ae) == (model != "flux-schnell", "ae.safetensors")
    assert (spec.repo_id, spec.repo_flow) == (f"black-forest-labs/{repo}", flow)


def test_unwritable_output_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli("--model", "flux-tiny", "--output_dir", str(blocker / "sub")) == 2


def test_help_documents_every_flag(capsys):
    import inspect

    assert capture_sample.run(["--help"]) == 0
    captured = capsys.readouterr()
    assert not captured.err  # on stdout, where `--help | less` finds it
    shown = " ".join(captured.out.split())
    assert "-h, --height" not in captured.out and "--height=HEIGHT" in captured.out  # -h is help
    doc = inspect.cleandoc(capture_sample.main.__doc__)  # Python 3.13 dedents docstrings itself
    for name in inspect.signature(capture_sample.main).parameters:
        # The entry: its first line and the more indented lines that continue it.
        entry = re.search(rf"\n    {name}: (.+(?:\n        .+)*)", doc)
        assert entry, f"{name} has no Args entry"
        assert " ".join(entry[1].split()) in shown, f"--help does not show all of --{name}'s entry"


def test_the_cli_defaults_are_the_run_options_defaults():
    """main's flags go to RunOptions by name: the same names, and defaults that agree, so that a run from
    Python (RunOptions) and one from the command line are the same run."""
    import dataclasses
    import inspect

    from flux.options import RunOptions

    cli_defaults = {n: p.default for n, p in inspect.signature(capture_sample.main).parameters.items()}
    cli_defaults.pop("progress")  # how the run reports, not what it does
    fields = {f.name: f.default for f in dataclasses.fields(RunOptions) if f.name != "warnings"}
    assert cli_defaults == fields


def test_cuda_out_of_memory_names_offload_and_smaller_sizes(monkeypatch, tmp_path, capsys):
    import flux.pipeline

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(flux.pipeline, "load_models", oom)
    rc = cli("--model", "flux-tiny", "--output_dir", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "--offload" in err and "--width/--height" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "hint"),
    [
        ("decode", "a smaller --decode_batch_size"),
        ("analyze", "Try --device cpu."),
        ("replay", "--device cpu"),
        ("sweep", "--resume"),
        ("attention", "The replay holds the flow model"),
    ],
)
def test_out_of_memory_in_a_command_names_only_its_own_flags(command, hint, tiny_run, monkeypatch, capsys):
    import flux.decode
    import flux.sweep

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(flux.decode, "load_model_final_layer", oom)
    monkeypatch.setattr(flux.sweep, "load_for_replay", oom)
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    assert capture_sample.run([command, pt, "--device", "cpu", "--progress", "False"]) == 1
    err = capsys.readouterr().err
    assert "ran out of memory" in err and hint in err
    module, _, name = capture_sample.COMMANDS[command].partition(":")
    own = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    assert {flag for flag in re.findall(r"--(\w+)", err)} <= set(own)  # no flag the command lacks


def test_metadata_records_shapes_and_paths(tiny_run):
    data = json.loads(_only(tiny_run / "intermediates", "metadata_*.json").read_text())
    assert data["shapes"]["double_blocks.0.img"] == [1, L, D] and data["shapes"]["single_blocks.2"] == [
        1,
        T + L,
        D,
    ]
    assert Path(data["files"]["capture"]).is_file() and Path(data["files"]["metadata"]).is_file()
    assert {"torch", "python", "transformers"} <= set(data["versions"])
    assert data["dtype"] == "float32" and data["device"] == "cpu" and data["timestamp"]


def test_offload_gives_the_same_image(tiny_run, tmp_path):
    # On the CPU the moves are no-ops, but the whole --offload code path runs and must not change the result.
    base = ["--model", "flux-tiny", "--prompt", "a red cube", "--seed", "1", *SIZE]
    assert cli(*base, "--offload", "True", "--capture", "False", "--output_dir", str(tmp_path)) == 0
    assert (tmp_path / "img_0.jpg").read_bytes() == (tiny_run / "img_0.jpg").read_bytes()


def _tensor_addresses(module) -> dict:
    """Parameters, and buffers (which a move replaces rather than re-points): where each one's data is."""
    return {n: (t.data_ptr(), t.dtype) for n, t in (*module.named_parameters(), *module.named_buffers())}


def test_offload_returns_each_module_to_the_tensors_it_was_loaded_into():
    """Back from the GPU, an offloaded module's parameters are the loaded tensors again (mapped from the
    checkpoint file): `.cpu()` would copy 24 GB into new memory. A move to bf16 stands in for the move to the
    GPU here: both give every parameter a new tensor through the same `param.data = ...`."""
    from flux.pipeline import load_models

    models = load_models(get_spec("flux-tiny"), "cpu", offload=True)
    for name in models.OFFLOADED:
        module = operator.attrgetter(name)(models)

        loaded = _tensor_addresses(module)
        module.to(torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())  # new tensors, as on the GPU
        models.to_host(name)
        assert _tensor_addresses(module) == loaded, name


def test_plan_flags_as_fire_parses_them(tmp_path):
    # Fire turns "--steps 0,3" into a tuple and "--steps 2" into an int.
    base = [
        "--model",
        "flux-tiny",
        "--prompt",
        "a",
        "--seed",
        "3",
        *SIZE,
        "--should_decode_intermediates",
        "False",
    ]
    assert (
        cli(*base, "--steps", "0,3", "--blocks", "double:1,single:0-2:2", "--output_dir", str(tmp_path)) == 0
    )
    capture = load_capture(_only(tmp_path / "intermediates", "capture_*.pt"))
    assert capture["metadata"]["captured_steps"] == [0, 3]
    assert list(capture["double_blocks"]) == ["block_1"] and list(capture["single_blocks"]) == [
        "block_0",
        "block_2",
    ]
    assert len(capture["double_blocks"]["block_1"]) == 2


def test_pt_capture_larger_than_host_memory_is_refused_before_loading(monkeypatch, tmp_path, capsys):
    import flux.options

    # On the CPU the models live in host memory too: leave 1000 bytes beside them.
    models = flux.options.model_host_bytes(flux.options.get_spec("flux-tiny"))
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: models + 1000)
    out = tmp_path / "o"
    assert cli("--model", "flux-tiny", *SIZE, "--output_dir", str(out)) == 1
    err = capsys.readouterr().err
    assert "--format safetensors" in err and "host memory" in err
    assert not out.exists()
    # Streaming needs only a few steps in memory, so it goes ahead.
    assert cli("--model", "flux-tiny", *SIZE, "--format", "safetensors", "--should_decode_intermediates",
               "False", "--output_dir", str(out)) == 0  # fmt: skip
    # --force skips the check: the .pt capture is attempted, and here it fits after all.
    forced = tmp_path / "forced"
    assert cli("--model", "flux-tiny", *SIZE, "--force", "--should_decode_intermediates", "False",
               "--output_dir", str(forced)) == 0  # fmt: skip
    assert len(list((forced / "intermediates").glob("capture_*_flux-tiny.pt"))) == 1


def test_capture_larger_than_the_disk_is_refused_before_loading(monkeypatch, tmp_path, capsys):
    import shutil

    import flux.options

    real = shutil.disk_usage
    monkeypatch.setattr(flux.options.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    out = tmp_path / "o"
    assert cli("--model", "flux-tiny", *SIZE, "--output_dir", str(out)) == 1
    err = capsys.readouterr().err
    assert "--force" in err and not out.exists()
    # flux-tiny captures float32 by default, so bf16 would halve it; a bf16 capture is not told so.
    assert "--capture_dtype bf16 (half the bytes)" in err
    assert cli("--model", "flux-tiny", *SIZE, "--capture_dtype", "bf16", "--output_dir", str(out)) == 1
    err = capsys.readouterr().err
    assert "needs about" in err and "--capture_dtype" not in err and not out.exists()
    # --force goes ahead on the user's word: the estimate is what was refused, not the write.
    assert cli("--model", "flux-tiny", *SIZE, "--force", "--should_decode_intermediates", "False",
               "--output_dir", str(out)) == 0  # fmt: skip
    assert len(list((out / "intermediates").glob("capture_*_flux-tiny.pt"))) == 1


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--streams", "txt"], "--should_decode_intermediates"),
        (["--capture", "False", "--analyze"], "--analyze"),
    ],
)
def test_flag_combinations_that_cannot_work_are_refused_up_front(args, flag, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli("--model", "flux-tiny", *SIZE, *args, "--output_dir", str(out)) == 2
    assert flag in capsys.readouterr().err and not out.exists()


def test_host_memory_check_counts_the_models_when_they_live_on_the_cpu(monkeypatch, tmp_path):
    import flux.options
    from flux.options import RunOptions, model_host_bytes

    spec_bytes = model_host_bytes(flux.options.get_spec("flux-tiny"))
    opts = RunOptions(model="flux-tiny", width=64, height=48, output_dir=str(tmp_path), device="cpu")
    needed = opts.validate().estimated_capture_bytes()
    # Enough memory for the capture alone, but not beside the models: refused on the CPU.
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: spec_bytes + int(needed * 1.1))
    with pytest.raises(flux.options.UserError, match="beside the models"):
        RunOptions(model="flux-tiny", width=64, height=48, output_dir=str(tmp_path), device="cpu").validate()
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: spec_bytes + 2 * needed)
    assert (
        not RunOptions(model="flux-tiny", width=64, height=48, output_dir=str(tmp_path), device="cpu")
        .validate()
        .warnings
    )
    # Less than the models alone: nothing left to judge the capture against, so a warning says so.
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: spec_bytes // 2)
    opts = RunOptions(
        model="flux-tiny", width=64, height=48, output_dir=str(tmp_path), device="cpu"
    ).validate()
    assert any(f"and {spec_bytes // 2 / 1e9:.1f} GB is available" in w for w in opts.warnings)


@pytest.mark.parametrize(
    ("command", "typo", "hint"),
    [
        ([], "--decode_targt", "--decode_target"),
        (["decode"], "--bogus", None),
        (["analyze"], "--animations", "--animation"),
        (["replay"], "--until_step", "--until"),
        (["sweep"], "--intervention-kind", "--intervention"),
        (["attention"], "--token", "--tokens"),
    ],
)
def test_an_unknown_flag_is_refused_before_anything_runs(command, typo, hint, tiny_run, tmp_path, capsys):
    """Fire would run the command with the flags it knows and complain about the rest only afterwards."""
    out = tmp_path / "o"
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    target = [pt] if command else ["--model", "flux-tiny", *SIZE]
    rc = capture_sample.run([*command, *target, "--output_dir", str(out), typo, "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"no flag {typo.replace('-', '_').replace('__', '--', 1)}" in err, err
    assert (f"Did you mean {hint}?" in err) if hint else "Did you mean" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--progress", "maybe"], "--progress"),
        (["decode", "PT", "--compile_decoder", "maybe"], "--compile_decoder"),
        (["analyze", "PT", "--animation", "maybe"], "--animation"),
        (["replay", "PT", "--save_capture", "yes"], "--save_capture"),
        (["attention", "PT", "--offload", "maybe"], "--offload"),
    ],
)
def test_a_switch_given_a_word_is_refused_in_every_command(argv, flag, tiny_run, tmp_path, capsys):
    out = tmp_path / "o"
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    argv = [pt if a == "PT" else a for a in argv]
    base = [] if argv[0] in capture_sample.COMMANDS else ["--model", "flux-tiny", *SIZE]
    rc = capture_sample.run([*base, *argv, "--output_dir", str(out)])
    assert rc == 2 and f"{flag} is a switch" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["decode", "analyze", "replay", "sweep", "attention"])
def test_every_command_has_a_help_screen_listing_its_flags(command, capsys):
    import inspect

    assert capture_sample.run([command, "--help"]) == 0
    shown = capsys.readouterr().out
    assert f"SYNOPSIS\n    capture_sample.py {command} PATH <flags>" in shown  # as it is typed, unquoted
    module, _, name = capture_sample.COMMANDS[command].partition(":")
    function = getattr(importlib.import_module(module), name)
    words = " ".join(shown.split())
    doc = inspect.cleandoc(function.__doc__)
    for flag, parameter in inspect.signature(function).parameters.items():
        listed = f"--{flag}" if parameter.default is not parameter.empty else flag.upper()  # a positional
        assert listed in shown, f"{command} --help does not list {listed}"
        entry = re.search(rf"\n    {flag}: (.+(?:\n        .+)*)", doc)
        assert entry, f"{command}: {flag} has no Args entry"
        assert " ".join(entry[1].split()) in words, f"{command} --help does not show all of {flag}'s entry"
    assert " ".join(function.__doc__.split()[:5]) in words  # what the command is for


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "flux-tiny", *SIZE, "--help"],
        ["-m", "flux-tiny", "-h"],
        ["--model", "flux-tiny", "--seed", "-h"],  # help, not a seed of "-h"
        ["--help", "--model", "flux-tiny"],
        ["decode", "PT", "--device", "cpu", "--help"],
        ["sweep", "PT", "-h"],
        ["replay", "PT", "--help", "--step", "1"],
        ["analyze", "PT", "--help"],
        ["decode", "PT", "--help=True"],
    ],
)
def test_help_anywhere_shows_help_and_runs_nothing(argv, tiny_run, tmp_path, monkeypatch, capsys):
    import flux.pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("--help started the command")

    import flux.decode
    import flux.sweep

    monkeypatch.setattr(flux.pipeline, "load_models", no_loading)
    monkeypatch.setattr(flux.decode, "load_model_final_layer", no_loading)
    monkeypatch.setattr(flux.sweep, "load_for_replay", no_loading)
    monkeypatch.chdir(tmp_path)
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    decoded_before = sorted((tiny_run / "intermediates").rglob("*"))
    argv = [pt if a == "PT" else a for a in argv]
    assert capture_sample.run([*argv, "--output_dir", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "NAME" in shown and "'\"'\"'" not in shown  # no garbled quoting
    assert not (tmp_path / "out").exists() and not (tmp_path / "output").exists()
    assert sorted((tiny_run / "intermediates").rglob("*")) == decoded_before


def test_a_prompt_may_be_the_word_help(monkeypatch):
    import flux.pipeline

    seen = []

    def stop_after_validation(self):
        seen.append(self.prompt)
        raise capture_sample.UsageError("stop here")

    monkeypatch.setattr(flux.pipeline.RunOptions, "validate", stop_after_validation)
    assert capture_sample.run(["--prompt=--help"]) == 2
    assert capture_sample.run(["--prompt", "-h"]) == 2
    assert seen == ["--help", "-h"]


def test_a_first_flag_named_like_a_command_is_that_flag(monkeypatch):
    """`--analyze` is close to the `analyze` command, but it is main's switch, not a mistyped command."""
    import flux.pipeline

    seen = []

    def stop_after_validation(self):
        seen.append((self.model, self.analyze))
        raise capture_sample.UsageError("stop here")

    monkeypatch.setattr(flux.pipeline.RunOptions, "validate", stop_after_validation)
    assert capture_sample.run(["--analyze", "--model", "flux-tiny"]) == 2
    assert capture_sample.run(["-analyze", "--model", "flux-tiny"]) == 2
    assert seen == [("flux-tiny", True), ("flux-tiny", True)]


def test_dash_h_is_help_and_a_mistyped_command_is_named(capsys):
    assert capture_sample.run(["-h"]) == 0
    assert "--decode_target" in capsys.readouterr().out  # help, not "--height must be a whole number"
    assert capture_sample.run(["anlyze", "x.pt"]) == 2
    assert "Did you mean `capture_sample.py analyze`?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["decode", "analyze", "replay", "sweep", "attention"])
def test_every_command_refuses_an_output_dir_it_cannot_make_before_loading(
    command, tiny_run, tmp_path, monkeypatch, capsys
):
    import flux.decode
    import flux.sweep

    def no_loading(*args, **kwargs):
        pytest.fail("a model was loaded before --output_dir was checked")

    monkeypatch.setattr(flux.decode, "load_model_final_layer", no_loading)
    monkeypatch.setattr(flux.sweep, "load_for_replay", no_loading)
    (tmp_path / "a_file").write_text("")
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    assert capture_sample.run([command, pt, "--output_dir", str(tmp_path / "a_file" / "sub")]) == 2
    assert f"{str(tmp_path / 'a_file')!r} is a file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "PT", "--step", "2", "--until", "1"], "--until 1 comes before --step 2"),
        (["sweep", "PT", "--scale", "5"], "--scale applies only to --intervention add, not skip"),
        (["sweep", "PT", "--intervention", "zero", "--source", "PT"], "--source applies only to"),
        (["sweep", "PT", "--direction", "d.pt"], "--direction applies only to --intervention add"),
        (["replay", "PT", "--source", "PT"], "--source is used only by patch:... interventions"),
        (
            ["replay", "PT", "--intervention", "skip:double:0", "--direction", "DIR"],
            "--direction is used only by add:... interventions",
        ),
    ],
)
def test_flags_that_cannot_apply_are_refused_before_loading(
    argv, message, tiny_run, tmp_path, monkeypatch, capsys
):
    _refused_before_loading(argv, message, tiny_run, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        *[
            (["sweep", "PT", "--intervention", "add", "--direction", "DIR", "--scale", v], "finite number")
            for v in ("nan", "inf", "-inf")
        ],
        (["replay", "PT", "--intervention", "add:double:0*1e999", "--direction", "DIR"], "finite number"),
        (["replay", "PT", "--intervention", "add:double:0", "--direction", "NAN_DIR"], "NaN or infinite"),
        (["sweep", "PT", "--intervention", "add", "--direction", "NAN_DIR"], "NaN or infinite"),
    ],
)
def test_a_scale_or_direction_that_is_not_finite_is_refused_before_loading(
    argv, message, tiny_run, tmp_path, monkeypatch, capsys
):
    """It would make every image NaN, and a sweep's scores NaN, which its JSON writes as null: 'unchanged'."""
    _refused_before_loading(argv, message, tiny_run, tmp_path, monkeypatch, capsys)


def _refused_before_loading(argv, message, tiny_run, tmp_path, monkeypatch, capsys):
    import flux.sweep

    monkeypatch.setattr(flux.sweep, "load_for_replay", lambda *a, **k: pytest.fail("a model was loaded"))
    files = {
        "PT": str(_only(tiny_run / "intermediates", "capture_*.pt")),
        "DIR": str(tmp_path / "d.pt"),
        "NAN_DIR": str(tmp_path / "nan.pt"),
    }
    torch.save(torch.zeros(D), files["DIR"])
    torch.save(torch.zeros(D).index_fill(0, torch.tensor([3]), float("nan")), files["NAN_DIR"])
    out = tmp_path / "out"
    assert capture_sample.run([files.get(a, a) for a in argv] + ["--output_dir", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_decode_of_blocks_or_steps_the_capture_lacks_is_a_usage_error_before_loading(
    tmp_path, monkeypatch, capsys
):
    import flux.decode

    assert cli("--model", "flux-tiny", *SIZE, "--steps", "1,3", "--blocks", "double:0",
               "--should_decode_intermediates", "False", "--output_dir", str(tmp_path)) == 0  # fmt: skip
    monkeypatch.setattr(flux.decode, "load_model_final_layer", lambda *a, **k: pytest.fail("loaded"))
    capture = _only(tmp_path / "intermediates", "capture_*.pt")
    out = tmp_path / "lens"
    for flags, message in (
        (["--steps", "0-3"], "Steps [0, 2] (--steps) were not captured; this capture holds steps [1, 3]."),
        (["--blocks", "single:1"], "single blocks [1] (--blocks) were not captured; this capture holds []."),
    ):
        assert capture_sample.run(["decode", str(capture), "--output_dir", str(out), *flags]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
        assert not out.exists()


def test_a_text_only_capture_is_refused_by_decode_before_loading(tmp_path, monkeypatch, capsys):
    import flux.decode

    assert cli("--model", "flux-tiny", *SIZE, "--streams", "txt", "--should_decode_intermediates", "False",
               "--output_dir", str(tmp_path)) == 0  # fmt: skip
    monkeypatch.setattr(flux.decode, "load_model_final_layer", lambda *a, **k: pytest.fail("loaded"))
    capture = _only(tmp_path / "intermediates", "capture_*.pt")
    assert capture_sample.run(["decode", str(capture)]) == 1
    assert "only text tokens (--streams txt)" in capsys.readouterr().err
    assert not (tmp_path / "intermediates" / "decoded").exists()


def test_a_capture_killed_before_writing_its_context_still_decodes(tmp_path, capsys):
    """Versions before the context was written up front left none when killed outright: the lens takes
    what it needs of it (text length, schedule) from the metadata."""
    assert cli("--model", "flux-tiny", *SIZE, "--format", "safetensors", "--should_decode_intermediates",
               "False", "--output_dir", str(tmp_path)) == 0  # fmt: skip
    capture = _only(tmp_path / "intermediates", "capture_*")
    index = json.loads((capture / "index.json").read_text())
    del index["context"]
    index["complete"] = False
    (capture / "index.json").write_text(json.dumps(index))
    (capture / "context.safetensors").unlink()
    assert capture_sample.run(["decode", str(capture), "--output_dir", str(tmp_path / "lens"),
                               "--progress", "False"]) == 0  # fmt: skip
    assert len(list((tmp_path / "lens").glob("*_block_*_step_*.jpg"))) == 5 * 4  # flux-tiny's 5 blocks
    capsys.readouterr()
    # A replay needs the text embeddings and ids, which such a capture lacks: refused, before loading.
    for command in ("replay", "sweep"):
        assert capture_sample.run([command, str(capture), "--output_dir", str(tmp_path / command)]) == 1
        assert "was killed before its context was written" in capsys.readouterr().err
        assert not (tmp_path / command).exists()


def test_a_command_that_fails_leaves_no_empty_folder(tmp_path, capsys):
    """A shard deleted after the run: decode and analyze fail on it, and leave no folder that would push
    the next run's output to `_1`."""
    assert cli("--model", "flux-tiny", *SIZE, "--format", "safetensors", "--should_decode_intermediates",
               "False", "--output_dir", str(tmp_path)) == 0  # fmt: skip
    capture = _only(tmp_path / "intermediates", "capture_*")
    (capture / "step_0000.safetensors").unlink()
    for command in ("decode", "analyze"):
        assert capture_sample.run([command, str(capture), "--progress", "False"]) == 1
        assert "is missing (moved or deleted)" in capsys.readouterr().err
    for folder in ("decoded", "analysis"):
        assert not (tmp_path / "intermediates" / folder / capture.name).exists()


def test_replay_numbers_skip_what_a_deleted_image_left(tiny_run, tmp_path):
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    replays = tmp_path / "replays"
    argv = ["replay", pt, "--step", "3", "--output_dir", str(replays), "--progress", "False"]
    assert capture_sample.run(argv) == 0
    first = (replays / "replay_0.json").read_bytes()
    (replays / "replay_0.jpg").unlink()  # by hand; its .json stays
    assert capture_sample.run(argv) == 0
    assert (replays / "replay_0.json").read_bytes() == first and (replays / "replay_1.jpg").is_file()


def test_a_direction_that_is_not_a_tensor_file_gets_no_advice_to_run_its_code(tiny_run, tmp_path, capsys):
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    text = tmp_path / "direction.txt"
    text.write_text("0.1 0.2 0.3")
    argv = [
        "sweep",
        pt,
        "--intervention",
        "add",
        "--direction",
        str(text),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert capture_sample.run(argv) == 2
    err = capsys.readouterr().err
    assert "is not a readable tensor file" in err and "weights_only=False" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["decode", "analyze", "replay", "sweep", "attention"])
def test_every_command_names_a_missing_capture_or_a_metadata_file_alike(command, tiny_run, tmp_path, capsys):
    assert capture_sample.run([command, str(tmp_path / "nothing.pt")]) == 2
    assert "No capture at" in capsys.readouterr().err
    meta = _only(tiny_run / "intermediates", "metadata_*.json")
    capture = _only(tiny_run / "intermediates", "capture_*.pt")
    assert capture_sample.run([command, str(meta)]) == 2
    err = capsys.readouterr().err
    assert "is a run's metadata, not its capture" in err and str(capture) in err
    # The folder the captures are in, and the lens folder made from one, name the capture to pass.
    assert capture_sample.run([command, str(tiny_run / "intermediates")]) == 2
    err = capsys.readouterr().err
    assert "is a folder of 1 capture(s), not a capture" in err and str(capture) in err
    lens = tiny_run / "intermediates" / "decoded" / capture.stem
    assert lens.is_dir() and capture_sample.run([command, str(lens)]) == 2
    err = capsys.readouterr().err
    assert "holds outputs made from a capture, not a capture" in err and repr(str(capture)) in err
    # A second run's folder (_1) and a sweep's ({stem}_{kind}) are named after the capture too.
    for made in ("attention", f"{capture.stem}_1"), ("sweeps", f"{capture.stem}_skip"):
        (folder := tiny_run / "intermediates" / made[0] / made[1]).mkdir(parents=True, exist_ok=True)
        assert capture_sample.run([command, str(folder)]) == 2
        assert f"not a capture: pass {str(capture)!r}" in capsys.readouterr().err


def test_a_weights_dir_that_is_not_a_folder_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli("--model", "flux-tiny", *SIZE, "--weights_dir", str(tmp_path / "nope"), "--output_dir", str(out))
    err = capsys.readouterr().err
    assert rc == 2 and "--weights_dir" in err and "ensure_tiny_repo" in err
    assert "Loading" not in err and not out.exists()  # refused before any model loads or folder is made


@pytest.mark.parametrize(
    "prompt", ["1984", "True", "None", "[cat, dog]", "1e3", 'a "quoted" prompt, isn\'t it', "café\nnext line"]
)
def test_a_prompt_arrives_exactly_as_typed(prompt, monkeypatch, tmp_path):
    """Fire would turn some of these into an int, a bool, None, a list or a float."""
    import flux.pipeline

    seen = []

    def stop_after_validation(self):
        seen.append((self.prompt, self.output_dir))
        raise capture_sample.UsageError("stop here")

    monkeypatch.setattr(flux.pipeline.RunOptions, "validate", stop_after_validation)
    assert capture_sample.run(["--prompt", prompt, "--output_dir", "2024"]) == 2
    assert capture_sample.run([f"--prompt={prompt}", "--model", "flux-tiny"]) == 2
    assert seen[0] == (prompt, "2024") and seen[1][0] == prompt


def test_single_dash_flags_are_read_and_checked_like_long_ones(monkeypatch, capsys):
    """Fire takes `-name` for `--name` and `-x` for the one flag starting with x; the checks must see them."""
    import flux.pipeline

    seen = []

    def stop_after_validation(self):
        seen.append((self.model, self.prompt, self.guidance))
        raise capture_sample.UsageError("stop here")

    monkeypatch.setattr(flux.pipeline.RunOptions, "validate", stop_after_validation)
    assert capture_sample.run(["-m", "flux-tiny", "-prompt", "1984", "-g=2.5"]) == 2
    assert capture_sample.run(["--prompt", "-h", "-model=flux-tiny"]) == 2  # a text flag's value stays
    assert seen == [("flux-tiny", "1984", 2.5), ("flux-tiny", "-h", None)]
    capsys.readouterr()
    assert capture_sample.run(["-p", "a cat"]) == 2
    assert "-p could be --prompt, --progress; spell the flag out" in capsys.readouterr().err
    assert capture_sample.run(["-promt", "a cat"]) == 2
    assert "has no flag --promt. Did you mean --prompt?" in capsys.readouterr().err
    assert capture_sample.run(["--nosuchflag", "--model", "flux-tiny"]) == 2  # "no" + a name it lacks
    assert "has no flag --nosuchflag." in capsys.readouterr().err
    assert len(seen) == 2  # refused before the run started
    assert capture_sample.run(["--guidance", "-inf", "--model", "flux-tiny"]) == 2  # a value, not a flag
    assert seen[2][::2] == ("flux-tiny", "-inf")  # which validation then refuses as not a number


@pytest.mark.parametrize("command", ["decode", "analyze", "replay", "sweep", "attention"])
def test_a_short_flag_is_the_one_its_help_offers(command, capsys):
    """`-p` is --progress in every subcommand's help; the positional `path` does not make it ambiguous."""
    module, _, name = capture_sample.COMMANDS[command].partition(":")
    function = getattr(importlib.import_module(module), name)
    assert capture_sample.run([command, "--help"]) == 0
    assert "-p, --progress" in capsys.readouterr().out
    assert capture_sample.long_flags(function, ["x.pt", "-p", "False"], command) == [
        "x.pt",
        "--progress",
        "False",
    ]


def test_the_size_estimate_is_printed_in_readable_units(tmp_path, capsys):
    assert cli("--model", "flux-tiny", *SIZE, "--should_decode_intermediates", "False", "--output_dir",
               str(tmp_path)) == 0  # fmt: skip
    estimate = re.search(r"Estimated capture size: ([\d.]+) (kB|MB) \(pt\)", capsys.readouterr().err)
    # flux-tiny at 64x48: 4 steps x (2 double blocks x (12 + 32) + 3 single blocks x 44) tokens x 64 x 4 bytes
    blocks = 4 * (2 * (L + T) + 3 * (L + T)) * D * 4
    assert estimate and blocks <= float(estimate[1]) * {"kB": 1e3, "MB": 1e6}[estimate[2]] < 2 * blocks


def test_a_text_flag_without_a_value_does_not_swallow_the_next_flag(monkeypatch):
    import flux.pipeline

    seen = []

    def stop_after_validation(self):
        seen.append((self.prompt, self.seed, self.weights_dir, self.device))
        raise capture_sample.UsageError("stop here")

    monkeypatch.setattr(flux.pipeline.RunOptions, "validate", stop_after_validation)
    assert capture_sample.run(["--prompt", "--seed", "3", "--weights_dir", "None", "--device", "None"]) == 2
    assert seen == [(True, 3, None, None)]  # True: refused by validation as "not text"; None: the default


def test_device_zero_means_the_first_gpu(monkeypatch):
    from flux.options import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(capture_sample.UsageError, match="no CUDA GPU is visible"):
        check_device("0")  # read as cuda:0, as torch.device(0) is; not "not a device"


def test_an_index_json_names_its_capture_folder(tmp_path, capsys):
    rc = cli("--model", "flux-tiny", *SIZE, "--format", "safetensors", "--should_decode_intermediates",
             "False", "--output_dir", str(tmp_path))  # fmt: skip
    assert rc == 0
    folder = _only(tmp_path / "intermediates", "capture_*")
    assert capture_sample.run(["decode", str(folder / "index.json")]) == 2
    assert f"pass its folder, {str(folder)!r}" in capsys.readouterr().err


def test_metadata_names_the_text_tokens_so_the_txt_stream_can_be_read(tiny_run):
    from transformers import AutoTokenizer

    from flux.tiny import ensure_tiny_repo

    data = json.loads(_only(tiny_run / "intermediates", "metadata_*.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_repo() / "tokenizer_2"))
    unpadded = tokenizer("a red cube")["input_ids"]  # no padding: exactly the real tokens, </s> last
    assert data["t5_tokens"] == tokenizer.convert_ids_to_tokens(unpadded)
    assert data["t5_tokens"][-1] == "</s>" and len(data["t5_tokens"]) < T
    meta = load_capture(_only(tiny_run / "intermediates", "capture_*.pt"))["metadata"]
    assert meta["t5_tokens"] == data["t5_tokens"]


def _documented_metadata_keys() -> set[str]:
    """The top-level names in docs/capture_format.md's metadata list (what is in brackets explains them)."""
    text = (ROOT / "docs" / "capture_format.md").read_text().split("## metadata", 1)[1]
    text = text.split("The `metadata_*.json` file")[0]
    depth, kept = 0, []
    for ch in text:
        depth += ch in "([{"
        kept.append(ch if depth == 0 else "")
        depth -= ch in ")]}"
    return {name.split()[0] for name in "".join(kept).replace(".", "").split(",") if name.strip()}


def test_the_documented_metadata_keys_are_the_written_ones(tiny_run):
    documented = _documented_metadata_keys()
    assert {"model", "seed", "flags", "t5_tokens", "schema_version"} <= documented  # the parse found the list
    written = json.loads(_only(tiny_run / "intermediates", "metadata_*.json").read_text())
    assert written.keys() == documented | {"complete"}
    loaded = load_capture(_only(tiny_run / "intermediates", "capture_*.pt"))["metadata"]
    assert loaded.keys() == documented | {"complete", "steps_done"}


@pytest.mark.parametrize("command", ["decode", "analyze", "replay", "sweep", "attention"])
@pytest.mark.parametrize(
    ("device", "gpus", "message"),
    [("0", 0, "no CUDA GPU is visible"), ("cuda:7", 1, "this machine has 1 CUDA GPU(s), numbered from 0")],
)
def test_every_command_reads_device_as_generation_does(
    command, device, gpus, message, tiny_run, tmp_path, monkeypatch, capsys
):
    """`--device 0` is the first GPU; a GPU the machine lacks is refused before loading (every command)."""
    import flux.decode
    import flux.sweep

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(flux.decode, "load_model_final_layer", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(flux.sweep, "load_for_replay", lambda *a, **k: pytest.fail("loaded"))
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    out = tmp_path / "out"
    assert capture_sample.run([command, pt, "--device", device, "--output_dir", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_replay_step_none_is_the_default(tiny_run, tmp_path):
    pt = str(_only(tiny_run / "intermediates", "capture_*.pt"))
    argv = ["replay", pt, "--step", "None", "--output_dir", str(tmp_path), "--progress", "False"]
    assert capture_sample.run(argv) == 0
    assert json.loads((tmp_path / "replay_0.json").read_text())["replayed_steps"] == [0, 3]  # all 4


def test_metadata_names_the_weights_it_loaded(tiny_run):
    """FLUX_MODEL and friends are not flags: the files they chose are recorded beside the flags."""
    from flux.tiny import ensure_tiny_repo

    repo = ensure_tiny_repo()
    data = json.loads(_only(tiny_run / "intermediates", "metadata_*.json").read_text())
    assert data["weights"] == {
        "flow": str(repo / "flux1-tiny.safetensors"),
        "ae": str(repo / "ae.safetensors"),
        "text_encoders": str(repo),
    }


def test_the_capture_estimate_counts_every_block_output_in_the_stored_dtype(roomy_machine):
    """flux-schnell at 256 px, worked out from the architecture: 19 double and 38 single blocks, 256 text and
    256 image tokens of 3,072 channels each, 4 steps, 2 bytes (bf16, fp16 and the model's bf16) or 4 (fp32)
    an element."""
    from flux.options import RunOptions

    per_step = (19 + 38) * (256 + 256) * 3072
    for dtype, itemsize in ((None, 2), ("bf16", 2), ("fp16", 2), ("fp32", 4)):
        opts = RunOptions(model="flux-schnell", capture_dtype=dtype, device="cpu").validate()
        assert opts.estimated_capture_bytes() == per_step * itemsize * 4
    opts = RunOptions(model="flux-schnell", capture_dtype="fp32", device="cpu", steps="0", streams="img")
    assert opts.validate().estimated_capture_bytes() == (19 + 38) * 256 * 3072 * 4  # image tokens, one step


def test_the_metadata_names_the_dtype_the_tensors_are_stored_in(tmp_path):
    """flux-tiny computes in float32; --capture_dtype fp16 stores float16, and the metadata says so."""
    flags = [
        "--capture_dtype",
        "fp16",
        "--should_decode_intermediates",
        "False",
        "--output_dir",
        str(tmp_path),
    ]
    assert cli("--model", "flux-tiny", *SIZE, *flags) == 0
    capture = load_capture(_only(tmp_path / "intermediates", "capture_*_flux-tiny.pt"))
    assert capture["metadata"]["capture_dtype"] == "float16" and capture["metadata"]["dtype"] == "float32"
    assert capture["single_blocks"]["block_0"][0].dtype == torch.float16


def test_a_side_off_the_grid_is_offered_the_nearest_multiple_of_16(tmp_path):
    from flux.options import RunOptions, UsageError

    # 30 px is 1.9 sixteens: 32 is nearest; 125 px is 7.8: 128; 8 px is below the smallest side, 16.
    for side, nearest in ((30, 32), (125, 128), (8, 16)):
        with pytest.raises(UsageError, match=f"got {side}. Try {nearest}."):
            RunOptions(model="flux-tiny", width=side, output_dir=str(tmp_path), device="cpu").validate()


def test_seed_and_guidance_take_every_value_their_flags_document(tmp_path):
    """--seed: 0 to 2**64 - 1 (what torch's generator takes); --guidance: any finite number >= 0, a float."""
    from flux.options import RunOptions, UsageError

    def options(**kw) -> RunOptions:
        return RunOptions(model="flux-tiny", output_dir=str(tmp_path), device="cpu", **kw).validate()

    assert options(seed=0).seed == 0 and options(seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(
        UsageError, match=r"--seed must be between 0 and 2\*\*64 - 1; got 18446744073709551616"
    ):
        options(seed=2**64)
    assert options(guidance=0).guidance == 0.0  # no guidance at all is a value, not an error
    with pytest.raises(UsageError, match=r"--guidance must be a finite number >= 0; got -0\.5"):
        options(guidance=-0.5)
    guidance = options(guidance=3).guidance  # Fire reads `--guidance 3` as an int
    assert guidance == 3.0 and type(guidance) is float  # recorded as 3.0, as --guidance 3.0 would be


def test_num_steps_is_a_whole_number_from_1_to_1000(tmp_path):
    """Both ends are allowed; a bool (Fire reads `--num_steps True` as one) or a fraction is not a count."""
    from flux.options import RunOptions, UsageError

    def options(num_steps) -> RunOptions:
        kw = dict(model="flux-tiny", capture=False, output_dir=str(tmp_path), device="cpu")
        return RunOptions(**kw, num_steps=num_steps).validate()

    assert options(1).num_steps == 1 and options(1000).num_steps == 1000
    with pytest.raises(UsageError, match=r"--num_steps must be at most 1000; got 1001\."):
        options(1001)
    for bad in (0, True, 2.5):
        with pytest.raises(UsageError, match=rf"--num_steps must be a whole number >= 1; got {bad!r}\."):
            options(bad)


def test_host_memory_that_only_just_holds_the_models_warns_rather_than_refuses(monkeypatch, tmp_path):
    """On the CPU the models take all the available memory, to the byte: nothing is left to judge the capture
    against, so the run is warned that it will page, not refused."""
    import flux.options
    from flux.options import RunOptions, model_host_bytes

    models = model_host_bytes(get_spec("flux-tiny"))
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: models)
    opts = RunOptions(model="flux-tiny", width=64, height=48, output_dir=str(tmp_path), device="cpu")
    assert [w for w in opts.validate().warnings if "page their weights in and out" in w]


def test_the_host_memory_refusal_names_the_capture_and_the_memory_beside_the_models(
    monkeypatch, tmp_path, roomy_machine
):
    """flux-schnell at 256 px on the CPU: 57 blocks x 512 tokens x 3,072 bf16 values x 4 steps = 717,225,984
    bytes (0.7 GB), over 80% of 0.8 GB left beside the models (0.64 GB). Nothing is pinned on a CPU, so
    nothing is said of pinned buffers."""
    import flux.options
    from flux.options import RunOptions, model_host_bytes

    beside = 800_000_000
    models = model_host_bytes(get_spec("flux-schnell"))
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: models + beside)
    with pytest.raises(UserError) as refused:
        RunOptions(model="flux-schnell", output_dir=str(tmp_path), device="cpu").validate()
    assert str(refused.value).startswith(
        "A .pt capture is held in memory until the run ends, and written from host memory: this one needs "
        "up to 0.7 GB, over 80% of the 0.8 GB available beside the models. Use --format safetensors"
    )


def test_a_pt_capture_is_refused_past_80_percent_of_the_memory_beside_the_models(monkeypatch, tmp_path):
    """flux-tiny at 64x48 on the CPU captures 4 steps x 5 blocks x (32 + 12) tokens x 64 float32 channels,
    225,280 bytes: refused when that is over 80% of the memory left beside the models, not at 90%."""
    import flux.options
    from flux.options import RunOptions, model_host_bytes

    models, held = model_host_bytes(get_spec("flux-tiny")), 4 * 5 * (T + L) * D * 4

    def validate():
        RunOptions(model="flux-tiny", width=64, height=48, output_dir=str(tmp_path), device="cpu").validate()

    monkeypatch.setattr(flux.options, "available_host_memory", lambda: models + int(held / 0.85))  # 85%
    with pytest.raises(UserError, match=r"over 80% of the 0\.0 GB available beside the models"):
        validate()
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: models + int(held / 0.75))  # 75%
    validate()


def test_with_offload_a_gpu_run_counts_the_models_in_host_memory_and_pinned_buffers_rounded_up(
    monkeypatch, tmp_path
):
    """On a GPU with --offload, the models live in host memory beside the .pt capture; without it they are on
    the GPU. Pinned buffers are counted at the power of two they take: per step, 2 double blocks of img
    (12 x 64 x 4 = 3,072 -> 4,096 bytes) and txt (32 x 64 x 4 = 8,192), and 3 single blocks of 44 x 64 x 4
    = 11,264 -> 16,384 bytes; 73,728 bytes a step, 294,912 for 4 steps."""
    import flux.options
    from flux.options import RunOptions, model_host_bytes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * 10**9, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a test GPU")
    pinned = 4 * (2 * (4096 + 8192) + 3 * 16384)
    # Just short of what the pinned capture needs beside the models, were they in host memory.
    available = model_host_bytes(get_spec("flux-tiny")) + int(pinned / 0.8) - 1
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: available)

    def options(offload: bool) -> RunOptions:
        kw = dict(model="flux-tiny", width=64, height=48, device="cuda", offload=offload)
        return RunOptions(**kw, output_dir=str(tmp_path)).validate()

    assert options(offload=False).estimated_capture_bytes(pinned=True) == pinned
    with pytest.raises(UserError, match=r"pinned buffers rounded up to powers of two"):
        options(offload=True)


def test_metadata_records_the_runs_own_values(tiny_run):
    """Worked out from the flags of `tiny_run` (64x48, flux-tiny's 4 steps, float32) and its files."""
    import hashlib

    data = json.loads(_only(tiny_run / "intermediates", "metadata_*.json").read_text())
    assert (data["width"], data["height"], data["num_steps"], len(data["timesteps"])) == (64, 48, 4, 5)
    # 4 steps x 5 blocks x (T + L) tokens x D channels x 4 bytes, as on disk (not pinned host buffers)
    assert data["estimated_capture_bytes"] == 4 * (2 + 3) * (T + L) * D * 4
    image = (tiny_run / "img_0.jpg").read_bytes()
    assert data["files"]["image_sha256"] == hashlib.sha256(image).hexdigest()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", data["timestamp"])  # with its UTC offset
    # Every runtime dependency the numbers or the files depend on (pyproject.toml), Pillow's JPEGs included.
    assert {"torch", "transformers", "safetensors", "huggingface_hub", "einops", "numpy", "pillow"} <= set(
        data["versions"]
    )
    # The .pt was written by a thread beside the lens, which also gave the capture's name back.
    assert not [p.name for p in (tiny_run / "intermediates").iterdir() if p.name.startswith(".")]


def test_decode_without_blocks_or_steps_shows_all_that_a_partial_capture_holds(tmp_path):
    rc = cli("--model", "flux-tiny", "--seed", "2", *SIZE, "--blocks", "double:1,single:2", "--steps", "0,3",
             "--should_decode_intermediates", "False", "--output_dir", str(tmp_path))  # fmt: skip
    assert rc == 0
    pt = _only(tmp_path / "intermediates", "capture_*.pt")
    assert cli("decode", str(pt), "--output_dir", str(tmp_path / "lens")) == 0
    expected = [
        f"{kind}_block_{i}_step_{k}.jpg" for kind, i in (("double", 1), ("single", 2)) for k in (0, 3)
    ]
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == sorted(
        [*expected, "grid_double.jpg", "grid_single.jpg"]
    )


def test_decode_hands_every_flag_to_the_lens(monkeypatch):
    import flux.pipeline

    seen = []
    monkeypatch.setattr(flux.pipeline, "decode_later", lambda *args, **kwargs: seen.append((args, kwargs)))
    argv = ["decode", "c.pt", "--output_dir", "o", "--decode_target", "next", "--device", "cpu",
            "--decode_batch_size", "3", "--compile_decoder", "--weights_dir", "w", "--blocks", "double:0",
            "--steps", "0,3"]  # fmt: skip
    assert cli(*argv) == 0
    expected = dict(target="next", device="cpu", batch_size=3, compile=True, weights_dir="w",
                    blocks="double:0", steps="0,3", progress=False)  # fmt: skip
    assert seen == [(("c.pt", "o"), expected)]


def test_the_disk_refusal_names_the_bytes_in_readable_units(monkeypatch, tmp_path):
    """flux-schnell at 256 px: 57 blocks x 512 tokens x 3,072 bf16 values x 4 steps = 717,225,984 bytes."""
    import shutil

    import flux.options
    from flux.options import RunOptions

    real = shutil.disk_usage
    monkeypatch.setattr(flux.options.shutil, "disk_usage", lambda p: real(p)._replace(free=10**8))
    with pytest.raises(UserError, match=r"needs about 717\.2 MB but .* has 100\.0 MB free"):
        RunOptions(model="flux-schnell", output_dir=str(tmp_path), device="cpu").validate()
    # A disk with no room at all, as a read-only file system reports it: not "0.00 GB".
    monkeypatch.setattr(flux.options.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    with pytest.raises(UserError, match=r"needs about 717\.2 MB but .* has 0 bytes free"):
        RunOptions(model="flux-schnell", output_dir=str(tmp_path), device="cpu").validate()


def test_available_host_memory_is_linuxs_memavailable_in_bytes(monkeypatch):
    """/proc/meminfo counts in kB of 1,024 bytes."""
    import io

    import flux.options

    meminfo = "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n"
    monkeypatch.setattr(flux.options, "open", lambda path: io.StringIO(meminfo), raising=False)
    assert flux.options.available_host_memory() == 8_000_000 * 1024


def test_the_gpu_refusal_names_each_models_share(monkeypatch):
    """flux-schnell on a 24 GB GPU: the flow model 2 x 11,891,178,560 bytes (23.8 GB), T5 and CLIP 9.8 GB, the
    AE 4 x 83,819,683 (0.3 GB): 33.9 GB together."""
    import flux.options

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 24 * 10**9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "a test GPU")
    with pytest.raises(UserError) as refused:
        flux.options.check_gpu_fits(get_spec("flux-schnell"), torch.device("cuda"), False)
    assert (
        "flux-schnell's models take 33.9 GB together (the flow model 23.8 GB, T5 and CLIP 9.8 GB), more than "
        "this GPU's 24.0 GB (a test GPU)."
    ) in str(refused.value)


def test_run_options_from_python_check_every_switch(tmp_path):
    """From Python, as the README shows, validate() is the only check: the CLI's switch check is not there."""
    from flux.options import RunOptions, UsageError

    for flag in ("offload", "capture", "force", "should_decode_intermediates", "analyze"):
        opts = RunOptions(model="flux-tiny", output_dir=str(tmp_path), device="cpu", **{flag: "yes"})
        with pytest.raises(UsageError, match=f"--{flag} is a switch"):
            opts.validate()


def test_flux_tinys_models_are_counted_at_the_size_of_their_files():
    """flux-tiny's generated weights, text encoders included, are a few MB: the memory checks must not count
    the 9.8 GB of the published T5 and CLIP beside them."""
    from flux.options import model_host_bytes
    from flux.tiny import ensure_tiny_repo

    files = sum(p.stat().st_size for p in ensure_tiny_repo().rglob("*") if p.is_file())
    assert 0 < model_host_bytes(get_spec("flux-tiny")) <= files
