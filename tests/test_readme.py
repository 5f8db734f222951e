"""The README's promises that can be checked mechanically: the loading snippet runs, every flag is listed."""

import inspect
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT))

import capture_sample  # noqa: E402


def _python_block(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def _tiny_capture(folder: Path, seed: int, fmt: str = "pt") -> Path:
    """A 64x48 flux-tiny capture (no lens) made through the CLI, as a README reader would."""
    args = [
        "--model",
        "flux-tiny",
        "--prompt",
        "a red cube",
        "--seed",
        str(seed),
        "--width",
        "64",
        "--height",
        "48",
    ]
    rc = capture_sample.run(
        [*args, "--format", fmt, "--should_decode_intermediates", "False", "--output_dir", str(folder)]
    )
    assert rc == 0
    return next((folder / "intermediates").glob("capture_*"))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_loading_snippet_runs_on_a_real_capture(tmp_path, fmt):
    capture = _tiny_capture(tmp_path, 1, fmt)
    code = _python_block("## Opening a capture")
    if fmt == "safetensors":  # torch.load is for .pt files; the snippet's second line covers directories
        code = code.replace("capture = torch.load(CAPTURE, weights_only=True)", "")
    # flux-tiny has 2 double and 3 single blocks, the published models 19 and 38.
    code = code.replace("block_37", "block_2").replace("block_3", "block_1")
    scope = {"CAPTURE": str(capture)}
    exec(compile(code, "README.md", "exec"), scope)
    # The shapes the snippet's comments promise, for flux-tiny at 64x48: T = 32, L = 4 * 3, D = 64.
    T, L, D = 32, 12, 64
    assert (scope["img"].shape, scope["txt"].shape, scope["x"].shape) == ((1, L, D), (1, T, D), (1, T + L, D))
    ctx, meta = scope["ctx"], scope["meta"]
    assert ctx["img_state"][0].shape == ctx["pred"][0].shape == (1, L, 64) and ctx["vec"][0].shape == (1, D)
    assert ctx["y"].shape == (1, 32) and ctx["txt"].shape == (1, T, 32) and ctx["txt_seq_len"] == T
    assert tuple(ctx["timestep_pairs"][0]) == (meta["timesteps"][0], meta["timesteps"][1])
    assert meta["model"] == "flux-tiny" and (meta["width"], meta["height"]) == (64, 48)


def test_one_block_snippet_decodes_what_the_sampler_produced(tmp_path, monkeypatch):
    """The lens snippet, pointed at the last single block at the last step, must give the final image: x0 of
    the model's last block is the sampler's own final latent."""
    import numpy as np
    import torch
    from PIL import Image

    from flux import get_spec
    from flux.decode import decode_latents, to_uint8
    from flux.loading import load_ae

    capture = _tiny_capture(tmp_path, 2)
    opening = (
        _python_block("## Opening a capture").replace("block_37", "block_2").replace("block_3", "block_1")
    )
    lens = _python_block("## The lens")
    assert '{"single": [20]}, steps=[2]' in lens  # the edit below must hit
    lens = lens.replace(
        '{"single": [20]}, steps=[2]', '{"single": [2]}, steps=[3]'
    )  # tiny: 3 blocks, 4 steps
    monkeypatch.chdir(tmp_path)
    scope = {"CAPTURE": str(capture)}
    exec(compile(opening + lens, "README.md", "exec"), scope)

    meta, ctx = scope["meta"], scope["ctx"]
    ae = load_ae(get_spec("flux-tiny"), "cpu")
    with torch.inference_mode():
        final = decode_latents(ctx["final_latent"], ae, meta["height"], meta["width"])[0]
    saved = np.asarray(Image.open(tmp_path / "single_20_step_2.png"))
    assert saved.shape == (48, 64, 3)
    assert np.array_equal(saved, to_uint8(final).numpy())


def test_python_capture_snippet_makes_one_run_per_prompt(tmp_path, monkeypatch, capsys):
    import torch

    from flux.store import load_capture

    section = README.split("To capture from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    monkeypatch.chdir(tmp_path)  # the default output folder, ./output
    capsys.readouterr()
    exec(compile("import torch\n" + code, "README.md", "exec"), {})
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("output")]
    assert [Path(image).name for image, _ in printed] == ["img_0.jpg", "img_1.jpg"]
    captures = [load_capture(tmp_path / capture) for _, capture in printed]
    assert [c["metadata"]["prompt"] for c in captures] == ["a red cube", "a blue ball"]
    noise = [c["denoising_context"]["img_state"][0] for c in captures]
    assert torch.equal(*noise)  # the same seed


def test_replay_snippet_reproduces_the_run_and_the_skip_moves_it(tmp_path, capsys):
    capture = _tiny_capture(tmp_path, 4)
    code = re.findall(r"```python\n(.*?)```", README.split("## Interventions", 1)[1], re.S)[0]
    assert 'Intervention("skip", "double", 3' in code
    code = code.replace('Intervention("skip", "double", 3', 'Intervention("skip", "double", 1')  # tiny: 2
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {"CAPTURE": str(capture)})
    same, moved = capsys.readouterr().out.split("\n")[:2]
    assert same == "True" and float(moved.removeprefix("tensor(").removesuffix(")")) > 0


def test_attention_snippet_measures_the_run(tmp_path, capsys):
    import torch

    from flux.attention import AttentionMaps

    capture = _tiny_capture(tmp_path, 5)
    code = _python_block("## Attention maps")
    assert '"single_blocks.10"' in code
    code = code.replace('"single_blocks.10"', '"single_blocks.2"')  # flux-tiny has 3
    capsys.readouterr()
    scope = {"CAPTURE": str(capture)}
    exec(compile(code, "README.md", "exec"), scope)
    shape, tokens, mean = capsys.readouterr().out.splitlines()[:3]
    maps, prompt = scope["maps"], scope["meta"]["t5_tokens"]
    # 4 steps, 5 blocks (2 double, 3 single), batch 1, the prompt's tokens, a 48 x 64 image's 3 x 4 patches
    assert isinstance(maps, AttentionMaps) and shape == f"torch.Size([4, 5, 1, {len(prompt)}, 3, 4])"
    assert tokens == str(prompt) and prompt[-1] == "</s>"
    n = len(prompt) - 2  # the token before </s>, at the last single block, step 3
    assert torch.equal(scope["where"], maps.maps[3, 4, :, n])
    assert mean == str(maps.maps[3, 4, :, n].mean())


def _flag_table() -> dict[str, str]:
    """{flag: the README table's default column}."""
    table = {}
    for flags, default in re.findall(r"^\| ((?:`--\w+`(?:, )?)+) \| (.*?) \|", README, re.M):
        table.update(dict.fromkeys(re.findall(r"`--(\w+)`", flags), default))
    return table


def test_every_flag_is_in_the_readme_table_with_its_real_default():
    table = _flag_table()
    # The table's literal defaults, read as a user would; the others depend on the model or the machine,
    # and the signature must then say None (tested per model below).
    literal = {"`flux-schnell`": "flux-schnell", '`"a beautiful landscape"`': "a beautiful landscape",
               "256": 256, "False": False, "True": True, "`output`": "output", "`pt`": "pt", "`both`": "both",
               "`x0`": "x0"}  # fmt: skip
    for name, param in inspect.signature(capture_sample.main).parameters.items():
        assert name in table, f"--{name} is not in the README's table"
        shown = table[name]
        if shown in literal:
            assert param.default == literal[shown] and type(param.default) is type(literal[shown]), name
        else:
            assert param.default is None, f"--{name}: the README says {shown!r}, the code {param.default!r}"


def _readme_commands() -> list[list[str]]:
    """Every `capture_sample.py` command in the README's bash blocks, as the argv after the script's name."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            if line.startswith("uv run python capture_sample.py"):
                commands.append(shlex.split(line, comments=True)[4:])
    return commands


# The README's commands name blocks of the published models (19 double, 38 single); flux-tiny has 2 and 3.
TINY_BLOCKS = {
    "double:0-5": "double:0-1",
    "double:3": "double:1",
    "single:10": "single:2",
    "single:0-37": "single:0-2",
}
# Their words are of the default prompt, "a beautiful landscape"; the tiny captures here are of "a red cube".
TINY_WORDS = {"landscape": "cube"}


def test_every_command_in_the_readme_gets_past_validation_to_loading(tmp_path, monkeypatch, capsys):
    """Each command a reader would copy passes every check of its flags and reaches the loading of its models,
    stopped there (flux-schnell's weights are not here). Saved captures are flux-tiny's, two of one size."""
    import flux.decode
    import flux.options
    import flux.pipeline
    import flux.sweep

    captures = {
        "CAPTURE": _tiny_capture(tmp_path / "a", 1),
        "OTHER_CAPTURE": _tiny_capture(tmp_path / "b", 2),
    }

    def stop(*args, **kwargs):
        raise capture_sample.UsageError("stopped where the models load")

    for module, loader in ((flux.pipeline, "load_models"), (flux.decode, "load_model_final_layer"),
                           (flux.sweep, "load_for_replay")):  # fmt: skip
        monkeypatch.setattr(module, loader, stop)
    monkeypatch.setattr(flux.pipeline, "buffers_while_loading", lambda opts: None)  # no big allocation here
    # flux-dev at 1024 px with every block is a 270 GB capture: the disk check is for the reader's disk, and
    # the host memory check (of a .pt beside 34 GB of models) for the reader's memory.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**60, 0, 2**60))
    monkeypatch.setattr(flux.options, "available_host_memory", lambda: 2**60)
    monkeypatch.chdir(tmp_path)  # the main command's default output folder, ./output
    commands = _readme_commands()
    assert len(commands) == 13
    assert {argv[0] for argv in commands} >= {"decode", "analyze", "sweep", "replay", "attention"}
    for argv in commands:
        argv = [
            str(captures["CAPTURE"]) if a.startswith("output/intermediates/capture_") else a for a in argv
        ]
        argv = [str(captures.get(a, a)) for a in argv]
        for published, tiny in TINY_BLOCKS.items():
            argv = [a.replace(published, tiny) for a in argv]
        argv = [TINY_WORDS.get(a, a) if i and argv[i - 1] == "--tokens" else a for i, a in enumerate(argv)]
        assert capture_sample.run(argv) == 2, argv
        assert capsys.readouterr().err.strip().splitlines()[-1] == "error: stopped where the models load", (
            argv
        )
    assert not (tmp_path / "output").exists()


def test_the_decode_flags_the_readme_lists_are_the_commands_flags():
    listed = README.split("Its flags (`decode --help`):", 1)[1].split("\n\n", 1)[0]
    flags = set(re.findall(r"`--(\w+)`", listed))
    assert flags == set(inspect.signature(capture_sample.decode).parameters) - {"path"}
