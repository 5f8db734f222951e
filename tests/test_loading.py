"""Weight resolution and strict loading: local files, the HF cache offline, and errors that say what to do."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux.configs import CONFIGS
from flux.errors import UserError
from flux.loading import (
    HUB,
    load_ae,
    load_flow_model,
    resolve_ae_path,
    resolve_flow_path,
    text_encoder_source,
)
from flux.tiny import ensure_tiny_repo

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIGS["flux-tiny"]


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    return ensure_tiny_repo(tmp_path_factory.mktemp("tiny") / "repo")


def test_local_directory_loads_strictly_into_exact_tensors(tiny_repo):
    model = load_flow_model(TINY, "cpu", torch.float32, weights_dir=tiny_repo)
    on_disk = load_file(tiny_repo / TINY.repo_flow)
    state = model.state_dict()
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in on_disk)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    ae = load_ae(TINY, "cpu", weights_dir=tiny_repo)
    assert next(ae.parameters()).dtype == torch.float32  # the checkpoint's own dtype


def test_env_vars_beat_the_default_folder_and_a_given_weights_dir_beats_them(
    tiny_repo, monkeypatch, tmp_path
):
    flow, ae, encoders = tmp_path / "flow.safetensors", tmp_path / "ae.safetensors", tmp_path / "encoders"
    shutil.copy(tiny_repo / TINY.repo_flow, flow)
    shutil.copy(tiny_repo / TINY.repo_ae, ae)
    encoders.mkdir()
    monkeypatch.setenv("FLUX_MODEL", str(flow))
    monkeypatch.setenv("FLUX_AE", str(ae))
    monkeypatch.setenv("FLUX_TEXT_ENCODERS", str(encoders))
    assert resolve_flow_path(TINY) == flow and resolve_ae_path(TINY) == ae  # over flux-tiny's default folder
    assert text_encoder_source(TINY) == encoders
    assert resolve_flow_path(TINY, tiny_repo) == tiny_repo / TINY.repo_flow  # --weights_dir wins
    assert resolve_ae_path(TINY, tiny_repo) == tiny_repo / TINY.repo_ae
    assert text_encoder_source(TINY, tiny_repo) == tiny_repo
    # A weights folder with only the flow and AE files leaves T5 and CLIP to FLUX_TEXT_ENCODERS (the published
    # models share schnell's), not to a 10 GB download; the folder's missing file names no variable it beats.
    only_weights = tmp_path / "only_weights"
    only_weights.mkdir()
    shutil.copy(flow, only_weights / TINY.repo_flow)
    assert text_encoder_source(TINY, only_weights) == encoders
    assert resolve_flow_path(TINY, only_weights) == only_weights / TINY.repo_flow
    with pytest.raises(UserError, match=r"has no ae\.safetensors .*into that directory\.$"):
        resolve_ae_path(TINY, only_weights)
    monkeypatch.setenv("FLUX_MODEL", str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="FLUX_MODEL points at"):
        resolve_flow_path(TINY)


def _write_variant(tiny_repo: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "variant"
    folder.mkdir()
    sd = load_file(tiny_repo / TINY.repo_flow)
    edit(sd)
    save_file(sd, folder / TINY.repo_flow)
    return folder


def test_missing_unexpected_and_misshaped_keys_are_named(tiny_repo, tmp_path):
    def edit(sd):
        del sd["final_layer.linear.bias"]
        sd["extra.weight"] = torch.zeros(1)
        sd["img_in.weight"] = torch.zeros(3, 3)

    folder = _write_variant(tiny_repo, tmp_path, edit)
    with pytest.raises(UserError) as err:
        load_flow_model(TINY, "cpu", torch.float32, weights_dir=folder)
    message = str(err.value)
    assert "final_layer.linear.bias" in message and "extra.weight" in message and "img_in.weight" in message
    assert "1 missing" in message and "1 unexpected" in message and "1 with the wrong shape" in message


def test_schnell_checkpoint_for_a_dev_config_is_refused(tiny_repo, tmp_path):
    folder = _write_variant(
        tiny_repo, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if "guidance_in" in k]
    )
    with pytest.raises(UserError, match="guidance_in"):
        load_flow_model(TINY, "cpu", torch.float32, weights_dir=folder)


def test_comfyui_prefix_is_stripped(tiny_repo, tmp_path):
    def edit(sd):
        for k in list(sd):
            sd["model.diffusion_model." + k] = sd.pop(k)

    folder = _write_variant(tiny_repo, tmp_path, edit)
    load_flow_model(TINY, "cpu", torch.float32, weights_dir=folder)


def test_truncated_checkpoint_gives_clear_error(tiny_repo, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    data = (tiny_repo / TINY.repo_flow).read_bytes()
    (folder / TINY.repo_flow).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"is truncated: its header describes {len(data):,} bytes, the file "
                       f"has {len(data) // 2:,}"):  # fmt: skip
        load_flow_model(TINY, "cpu", torch.float32, weights_dir=folder)
    (folder / TINY.repo_flow).write_bytes(data[:-4])  # short by its last float: the 8-byte length counts
    with pytest.raises(UserError, match=f"is truncated: its header describes {len(data):,} bytes, the file "
                       f"has {len(data) - 4:,}"):  # fmt: skip
        load_flow_model(TINY, "cpu", torch.float32, weights_dir=folder)
    (folder / TINY.repo_flow).write_bytes(data[:100])  # cut inside the JSON header
    with pytest.raises(UserError, match="is truncated: it ends inside its own header"):
        load_flow_model(TINY, "cpu", torch.float32, weights_dir=folder)


def test_missing_file_in_weights_dir(tmp_path):
    with pytest.raises(UserError, match=r"has no flux1-tiny\.safetensors"):
        resolve_flow_path(TINY, tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        resolve_flow_path(TINY, tmp_path / "nope")


def test_flux_tiny_from_the_hub_is_refused_unless_a_cache_or_a_mirror_has_it(
    tiny_repo, tmp_path, monkeypatch
):
    """flux-tiny was never uploaded: `--weights_dir hub` would retry huggingface.co for half a minute and then
    suggest downloading it. It is refused before loading, unless the cache holds a copy or HF_ENDPOINT names
    another hub."""
    from huggingface_hub import constants

    import capture_sample
    from flux.loading import check_weights_dir

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    with pytest.raises(UserError, match=r"flux-tiny is not on the Hugging Face hub.*Leave out --weights_dir"):
        check_weights_dir(TINY, HUB)
    check_weights_dir(CONFIGS["flux-schnell"], HUB)  # the published models are looked up when they load
    args = [
        "--model",
        "flux-tiny",
        "--weights_dir",
        "hub",
        "--prompt",
        "a cat",
        "--output_dir",
        str(tmp_path),
    ]
    assert capture_sample.run(args) == 2
    assert not any(tmp_path.glob("capture_*")) and not (tmp_path / "intermediates").exists()

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a mirror may hold it
    check_weights_dir(TINY, HUB)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co/")
    _populate_hf_cache(tmp_path / "cache", TINY.repo_id, tiny_repo)
    check_weights_dir(TINY, HUB)


def test_gated_repo_error_explains_licence_and_token(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, "401 gated")
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(UserError) as err:
        resolve_flow_path(CONFIGS["flux-dev"])
    assert "HF_TOKEN" in str(err.value) and "black-forest-labs/FLUX.1-dev" in str(err.value)


def _populate_hf_cache(cache: Path, repo_id: str, source: Path) -> None:
    """The layout huggingface_hub writes: refs/main -> commit, snapshots/<commit>/<files>."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def test_hub_path_offline_from_a_prepopulated_cache(tiny_repo, tmp_path):
    cache = tmp_path / "hf-cache"
    _populate_hf_cache(cache, TINY.repo_id, tiny_repo)
    script = textwrap.dedent(
        f"""
        import torch
        from flux.configs import CONFIGS
        from flux.errors import UserError
        from flux.loading import HUB, load_flow_model, load_text_encoders, resolve_ae_path, resolve_flow_path

        spec = CONFIGS["flux-tiny"]
        path = resolve_flow_path(spec, HUB)
        assert str(path).startswith({str(cache)!r}), path
        assert str(resolve_ae_path(spec, HUB)).startswith({str(cache)!r})
        model = load_flow_model(spec, "cpu", torch.float32, weights_dir=HUB)
        t5, clip = load_text_encoders(spec, "cpu", torch.float32, weights_dir=HUB)
        print("T5", tuple(t5(["a red cube"]).shape), "CLIP", tuple(clip(["a red cube"]).shape))
        try:
            resolve_flow_path(CONFIGS["flux-dev"], HUB)
        except UserError as e:
            print("ERROR", e)
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "FLUX_TINY_DIR": str(tiny_repo)}
    env.pop("HF_HOME", None)
    # "hub" overrides the local-file variables: these would fail if read.
    missing = str(tmp_path / "missing")
    env.update(
        FLUX_MODEL=missing + ".safetensors", FLUX_AE=missing + ".safetensors", FLUX_TEXT_ENCODERS=missing
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "T5 (1, 32, 32) CLIP (1, 32)" in out.stdout
    assert "ERROR" in out.stdout and "HF_HUB_OFFLINE is set" in out.stdout and "FLUX.1-dev" in out.stdout
    assert HUB == "hub"


def test_progress_false_silences_library_bars_and_puts_the_switches_back(tiny_repo, capfd):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    from flux.loading import library_progress_bars, load_text_encoders

    def switches():
        return transformers_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()

    transformers_logging.enable_progress_bar()
    enable_progress_bars()
    capfd.readouterr()
    with library_progress_bars(False):
        inside = switches()
        load_text_encoders(TINY, "cpu", torch.float32, weights_dir=tiny_repo)
    assert inside == (False, False)
    assert "it/s" not in capfd.readouterr().err  # no tqdm line from either library
    assert switches() == (True, True)

    disable_progress_bars()  # a user who turned the hub's bars off keeps them off
    try:
        with library_progress_bars(False):
            pass
        assert switches() == (True, False)
    finally:
        enable_progress_bars()


# ------------------------------------------------------------------------- files given by mistake
def _tiny_file(tiny_repo: Path, tmp_path: Path, name: str, edit) -> Path:
    sd = load_file(tiny_repo / TINY.repo_flow)
    sd = edit(sd) or sd
    save_file(sd, tmp_path / name)
    return tmp_path / name


def test_wrong_files_are_refused_from_their_header_before_the_text_encoders_load(
    tiny_repo, tmp_path, monkeypatch
):
    """A wrong FLUX_MODEL or FLUX_AE is named (what it is, not only its key counts) before T5 and CLIP,
    10 GB for the published models, are fetched or loaded, and before any tensor is read."""
    import flux.loading
    import flux.pipeline

    monkeypatch.setattr(flux.pipeline, "load_text_encoders", lambda *a, **k: pytest.fail("T5 loaded first"))
    monkeypatch.setattr(flux.loading, "read_state_dict", lambda *a, **k: pytest.fail("tensors read"))
    monkeypatch.setenv("FLUX_TINY_DIR", str(tiny_repo))
    monkeypatch.setenv("FLUX_TEXT_ENCODERS", str(tiny_repo / "nowhere"))  # reported first, before any file
    monkeypatch.setattr(
        flux.pipeline, "resolve_flow_path", lambda *a, **k: pytest.fail("flow resolved first")
    )
    with pytest.raises(UserError, match="FLUX_TEXT_ENCODERS points at"):
        flux.pipeline.load_models(TINY, "cpu")
    monkeypatch.undo()
    monkeypatch.setattr(flux.pipeline, "load_text_encoders", lambda *a, **k: pytest.fail("T5 loaded first"))
    monkeypatch.setattr(flux.loading, "read_state_dict", lambda *a, **k: pytest.fail("tensors read"))
    monkeypatch.setenv("FLUX_TINY_DIR", str(tiny_repo))
    monkeypatch.setenv("FLUX_MODEL", str(tiny_repo / TINY.repo_ae))  # the AE given as the flow model
    with pytest.raises(UserError, match=r"It looks like the autoencoder \(ae\.safetensors\)\.$"):
        flux.pipeline.load_models(TINY, "cpu")
    monkeypatch.delenv("FLUX_MODEL")
    monkeypatch.setenv("FLUX_AE", str(tiny_repo / TINY.repo_flow))  # and the reverse
    with pytest.raises(UserError, match=r"FLUX autoencoder: .* It looks like a flow transformer"):
        flux.pipeline.load_models(TINY, "cpu")
    monkeypatch.delenv("FLUX_AE")

    def diffusers_names(sd):
        return {k.replace("double_blocks.", "transformer_blocks."): v for k, v in sd.items()}

    monkeypatch.setenv(
        "FLUX_MODEL", str(_tiny_file(tiny_repo, tmp_path, "diffusers.safetensors", diffusers_names))
    )
    with pytest.raises(UserError, match="It looks like a diffusers-format transformer"):
        flux.pipeline.load_models(TINY, "cpu")


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"PK\x03\x04" + bytes(100), "is a PyTorch .pt/.ckpt file"),
        (b"GGUF" + bytes(100), "is a GGUF file"),
        (b"<!DOCTYPE html><html>" + bytes(100), "is an HTML page"),
        (b"", "is not a safetensors file"),
    ],
)
def test_files_that_are_not_safetensors_are_named(content, named, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=named):
        load_flow_model(TINY, "cpu", torch.float32, path=path)


def test_pickled_checkpoint_is_named(tiny_repo, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(load_file(tiny_repo / TINY.repo_flow), path)
    with pytest.raises(UserError, match=r"is a PyTorch \.pt/\.ckpt file"):
        load_flow_model(TINY, "cpu", torch.float32, path=path)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("F8_E4M3", "holds F8_E4M3 tensors: a quantised copy"),
        ("I8", "holds I8 tensors: not weights this tool can run"),
        ("U8", "holds U8 tensors"),
    ],
)
def test_checkpoints_in_other_dtypes_are_refused(name, why, tiny_repo, tmp_path):
    path = _tiny_file(
        tiny_repo, tmp_path, "q.safetensors", lambda sd: {k: v.to(torch.uint8) for k, v in sd.items()}
    )
    # One-byte tensors tagged with the dtype by hand: safetensors 0.4 cannot write float8 itself.
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    for key, info in header.items():
        if key != "__metadata__":
            info["dtype"] = name
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])
    with pytest.raises(UserError, match=why):
        load_flow_model(TINY, "cpu", torch.float32, path=path)


def test_a_float32_checkpoint_loads_converted_to_bf16(tiny_repo, tmp_path):
    path = tiny_repo / TINY.repo_flow  # flux-tiny's own file is float32
    model = load_flow_model(TINY, "cpu", path=path)  # bf16 by default, the published models' dtype
    on_disk = load_file(path)
    assert all(v.dtype == torch.float32 for v in on_disk.values())
    state = model.state_dict()
    assert all(
        state[k].dtype == torch.bfloat16 and torch.equal(state[k], v.to(torch.bfloat16))
        for k, v in on_disk.items()
    )


def test_text_encoders_load_and_answer_in_the_dtype_asked_for(tiny_repo):
    """bf16 by default (the published encoders' dtype): parameters and outputs both (the tiny files are
    float32, so a loader that ignored the dtype would give float32)."""
    from flux.loading import load_text_encoders

    t5, clip = load_text_encoders(TINY, "cpu", weights_dir=tiny_repo)
    for embedder in (t5, clip):
        assert {p.dtype for p in embedder.parameters()} == {torch.bfloat16}
        assert embedder(["a red cube"]).dtype == torch.bfloat16


def test_text_encoders_of_another_width_are_refused(tiny_repo):
    import dataclasses

    from flux.loading import load_text_encoders

    wider = dataclasses.replace(TINY, params=dataclasses.replace(TINY.params, context_in_dim=48))
    with pytest.raises(UserError, match=r"T5 text encoder in .* gives vectors of 32, but flux-tiny reads 48"):
        load_text_encoders(wider, "cpu", torch.float32, weights_dir=tiny_repo)


def test_flux_text_encoders_must_be_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_TEXT_ENCODERS", "black-forest-labs/FLUX.1-schnell")
    repo = "black-forest-labs/FLUX.1-schnell"
    with pytest.raises(UserError, match=re.escape(f"FLUX_TEXT_ENCODERS points at {repo!r}, which is not a")):
        text_encoder_source(TINY)


def test_a_full_disk_while_downloading_says_where_to_make_room(monkeypatch):
    import errno

    import huggingface_hub

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    with pytest.raises(
        UserError, match=r"The disk filled up while downloading flux1-schnell\.safetensors .*HF_HOME"
    ):
        resolve_flow_path(CONFIGS["flux-schnell"])
