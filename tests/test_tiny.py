"""flux-tiny: deterministic bytes, the real repo layout, atomic creation."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flux.tiny
from flux.autoencoder import AutoEncoder
from flux.configs import CONFIGS, TINY_AE_PARAMS, TINY_PARAMS
from flux.errors import UserError
from flux.model import Flux
from flux.tiny import TINY_SEED, ensure_tiny_repo, tiny_repo_dir, write_tiny_repo

SPEC = CONFIGS["flux-tiny"]
LAYOUT = [
    SPEC.repo_flow,
    SPEC.repo_ae,
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json",
]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "flux-tiny"
    write_tiny_repo(root, TINY_SEED)
    return root


def test_layout_matches_the_real_repos(repo):
    for name in LAYOUT:
        assert (repo / name).is_file(), name
    index = json.loads((repo / "text_encoder_2/model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert set(load_file(repo / "text_encoder_2" / shard)) <= set(index["weight_map"])
    # Checkpoint key names, as in the real files, whatever this transformers version calls them inside.
    assert all(k.startswith("text_model.") for k in load_file(repo / "text_encoder/model.safetensors"))
    assert "shared.weight" in index["weight_map"]
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in index["weight_map"]
    size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    assert size < 20e6
    # Every file with the permissions the folder gives new files (safetensors 0.8 makes its own owner-only).
    modes = {p.stat().st_mode & 0o777 for p in repo.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~_umask()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_flow_and_ae_weights_load_strictly_in_float32(repo):
    for module, name in ((Flux(TINY_PARAMS), SPEC.repo_flow), (AutoEncoder(TINY_AE_PARAMS), SPEC.repo_ae)):
        state = load_file(repo / name)
        assert all(t.dtype == torch.float32 for t in state.values())
        module.load_state_dict(state, strict=True)


def test_weights_follow_default_init_bounds(repo):
    state = load_file(repo / SPEC.repo_flow)
    w, b = state["img_in.weight"], state["img_in.bias"]
    bound = 1 / TINY_PARAMS.in_channels**0.5  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert b.abs().max() <= bound and b.std() > 0
    assert torch.equal(state["double_blocks.0.img_attn.norm.query_norm.scale"], torch.ones(32))
    # A convolution's fan_in counts its kernel: 3 channels x 3 x 3 for the AE's first one.
    conv = load_file(repo / SPEC.repo_ae)["encoder.conv_in.weight"]
    assert conv.shape[1:] == (3, 3, 3)
    assert 0.9 / 27**0.5 < conv.abs().max() <= 1 / 27**0.5


def test_same_seed_same_bytes_and_global_rng_untouched(repo, tmp_path):
    before = torch.random.get_rng_state()
    write_tiny_repo(tmp_path / "again", TINY_SEED)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert _files(tmp_path / "again") == _files(repo)


def test_other_seed_other_weights(repo, tmp_path):
    write_tiny_repo(tmp_path / "seed1", seed=1)
    a, b = load_file(repo / SPEC.repo_flow), load_file(tmp_path / "seed1" / SPEC.repo_flow)
    assert not torch.equal(a["img_in.weight"], b["img_in.weight"])


def test_tiny_repo_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_TINY_DIR", str(tmp_path / "here"))
    assert tiny_repo_dir() == tmp_path / "here"
    monkeypatch.delenv("FLUX_TINY_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert tiny_repo_dir() == tmp_path / "cache" / "flux-intermediate-representation" / "flux-tiny-v2"


def test_ensure_creates_once_and_is_idempotent(monkeypatch, tmp_path, repo, capfd):
    root = tmp_path / "tiny"
    monkeypatch.setenv("FLUX_TINY_DIR", str(root))
    assert ensure_tiny_repo() == root
    assert _files(root) == _files(repo)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary sibling left
    assert (
        capfd.readouterr().err == f"Making flux-tiny's weights from seed 0 in {root} (once, a few seconds).\n"
    )

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt an existing repo")

    monkeypatch.setattr(flux.tiny, "write_tiny_repo", must_not_rebuild)
    assert ensure_tiny_repo() == root
    assert capfd.readouterr().err == ""  # said only when the files are made


def test_failure_mid_write_leaves_nothing(monkeypatch, tmp_path):
    root = tmp_path / "tiny"
    calls = []
    real_save = flux.tiny.save_file

    def save_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:  # flow and AE written, then the CLIP weights fail
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(flux.tiny, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ensure_tiny_repo(root)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(flux.tiny, "save_file", real_save)
    assert (ensure_tiny_repo(root) / SPEC.repo_ae).is_file()


def test_lost_race_keeps_the_winner(monkeypatch, tmp_path, repo):
    root = tmp_path / "tiny"
    real_write = flux.tiny.write_tiny_repo

    def other_process_wins(path, seed):
        real_write(path, seed)
        real_write(root, seed)  # the other process renames its copy into place first

    monkeypatch.setattr(flux.tiny, "write_tiny_repo", other_process_wins)
    assert ensure_tiny_repo(root) == root
    assert _files(root) == _files(repo)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_a_rename_that_fails_for_another_reason_is_not_taken_for_a_lost_race(monkeypatch, tmp_path):
    import errno

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "permission denied", str(dst))

    monkeypatch.setattr(flux.tiny.os, "replace", refuse)
    with pytest.raises(PermissionError):
        ensure_tiny_repo(tmp_path / "tiny")  # not a path to a folder that holds nothing
    assert list(tmp_path.iterdir()) == []  # and its temporary copy is gone


def test_foreign_nonempty_dir_is_a_user_error(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "something.txt").write_text("not ours")
    with pytest.raises(UserError, match="not a complete flux-tiny repo"):
        ensure_tiny_repo(tmp_path / "tiny")


def test_ensure_fills_an_empty_directory(tmp_path):
    (tmp_path / "tiny").mkdir()
    assert (ensure_tiny_repo(tmp_path / "tiny") / SPEC.repo_flow).is_file()
