"""Text embedders on the flux-tiny encoders: shapes, padding, truncation, CLIP pooling, error messages."""

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import flux.conditioner
from flux.conditioner import TextEmbedder, load_text_embedder
from flux.configs import CONFIGS
from flux.errors import UserError
from flux.tiny import ensure_tiny_repo

SPEC = CONFIGS["flux-tiny"]
PROMPTS = ["a photo of a red cat", "a painting of a blue house on a mountain at night"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return ensure_tiny_repo(tmp_path_factory.mktemp("tiny") / "flux-tiny")


@pytest.fixture(scope="module")
def t5(repo) -> TextEmbedder:
    return load_text_embedder(
        "t5", repo, "text_encoder_2", "tokenizer_2", SPEC.t5_max_length, "cpu", torch.float32
    )


@pytest.fixture(scope="module")
def clip(repo) -> TextEmbedder:
    return load_text_embedder(
        "clip", repo, "text_encoder", "tokenizer", SPEC.clip_max_length, "cpu", torch.float32
    )


def test_t5_shape_dtype_and_prompt_dependence(t5):
    txt = t5(PROMPTS)
    assert txt.shape == (2, SPEC.t5_max_length, SPEC.params.context_in_dim)
    assert txt.dtype == torch.float32 and txt.device.type == "cpu"
    assert not torch.allclose(txt[0], txt[1])
    assert not t5.model.training and not any(p.requires_grad for p in t5.parameters())


def test_clip_shape_and_dtype(clip):
    vec = clip(PROMPTS)
    assert vec.shape == (2, SPEC.params.vec_in_dim) and vec.dtype == torch.float32
    assert not torch.allclose(vec[0], vec[1])


def test_output_dtype_is_what_was_asked(repo):
    t5 = load_text_embedder("t5", repo, "text_encoder_2", "tokenizer_2", 8, "cpu", torch.bfloat16)
    assert t5(["a cat"]).dtype == torch.bfloat16


def test_padding_to_max_length_without_mask(t5, repo):
    ids = t5.tokenize(["a cat"])
    tok = t5.tokenizer
    assert ids.shape == (1, SPEC.t5_max_length)
    # "a cat" is two known words, then </s>, then <pad> to the end.
    expected = tok.convert_tokens_to_ids(["▁a", "▁cat", "</s>"]) + [tok.pad_token_id] * (
        SPEC.t5_max_length - 3
    )
    assert ids[0].tolist() == expected
    # No mask: padding tokens attend and are attended to, so the padded length changes every position, by
    # far more than float noise (with a mask, the two differ by about 1e-6).
    short = load_text_embedder("t5", repo, "text_encoder_2", "tokenizer_2", 8, "cpu", torch.float32)
    assert (t5(["a cat"])[0, :3] - short(["a cat"])[0, :3]).abs().max() > 1e-2


def test_a_single_string_is_refused(t5):
    with pytest.raises(TypeError, match="list of strings"):
        t5("a cat")  # it would be read as five one-letter prompts


def test_token_strings_end_with_the_end_of_text_token_however_the_text_pads(t5, clip):
    """The positions that are not padding, told by the tokenizer's mask: CLIP pads with its end-of-text
    token, and a prompt may spell out T5's pad token, which must not end the list early."""
    assert clip.token_strings("a red cat") == [
        "<|startoftext|>",
        "a</w>",
        "red</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    assert t5.token_strings("a cat") == ["▁a", "▁cat", "</s>"]
    assert t5.token_strings("a <pad> cat") == ["▁a", "<pad>", "▁cat", "</s>"]
    # A character outside the vocabulary is T5's <unk>, id 2 (0 is <pad>, 1 is </s>), not padding.
    assert t5.token_strings("a 日 cat") == ["▁a", "▁", "<unk>", "▁cat", "</s>"]
    assert t5.tokenize(["a 日 cat"])[0, :5].tolist()[2] == 2
    assert len(t5.token_strings(" ".join(["a red cat"] * 40))) == SPEC.t5_max_length  # truncated: no padding


def test_truncation_of_long_prompt(t5, clip):
    long_prompt = " ".join(["a red cat"] * 40)
    ids = t5.tokenize([long_prompt])
    assert ids.shape == (1, SPEC.t5_max_length)
    assert ids[0, -1].item() == t5.tokenizer.eos_token_id  # truncation keeps the closing </s>
    assert (ids[0] != t5.tokenizer.pad_token_id).all()
    assert t5([long_prompt]).shape == (1, SPEC.t5_max_length, SPEC.params.context_in_dim)
    clip_ids = clip.tokenize([long_prompt])
    assert clip_ids.shape == (1, SPEC.clip_max_length)
    assert clip_ids[0, 0].item() == clip.tokenizer.bos_token_id
    assert clip_ids[0, -1].item() == clip.tokenizer.eos_token_id


def test_clip_tokenizer_is_the_class_the_reference_names(clip):
    # BFL's and diffusers' pipelines load CLIPTokenizer. Under transformers 4 that is the Python tokenizer,
    # which AutoTokenizer would swap for the Rust one; they tokenize CJK text differently (the Python one
    # splits each character into a word of its own). Under transformers 5 both names are the Rust one.
    import transformers

    assert type(clip.tokenizer) is transformers.CLIPTokenizer
    rust = transformers.AutoTokenizer.from_pretrained(clip.tokenizer.name_or_path)
    ids = {name: t("日本の猫").input_ids for name, t in (("ours", clip.tokenizer), ("auto", rust))}
    assert clip.tokenizer("a red cube").input_ids == rust("a red cube").input_ids
    if int(transformers.__version__.split(".")[0]) < 5:
        assert ids["ours"] != ids["auto"]
    else:
        assert ids["ours"] == ids["auto"]


def test_clip_pools_the_first_end_of_text_token(clip):
    prompts = ["a cat", "a photo of a green tree in the city", "zzz qq"]
    vec = clip(prompts)
    ids = clip.tokenize(prompts)
    hidden = clip.model(input_ids=ids).last_hidden_state
    eos = clip.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for b, row in enumerate(ids.tolist()):
        position = row.index(eos)  # first end-of-text; later ones are padding with the same id
        assert position == len(clip.tokenizer.tokenize(prompts[b])) + 1
        torch.testing.assert_close(vec[b], hidden[b, position])
        assert not torch.allclose(vec[b], hidden[b, position + 1])


def test_missing_subfolder_is_a_user_error(repo, tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(UserError, match=r"no text_encoder/ subfolder.*FLUX_TEXT_ENCODERS"):
        load_text_embedder("clip", tmp_path, "text_encoder", "tokenizer", 77, "cpu", torch.float32)


def test_empty_model_folder_is_a_user_error(tmp_path, repo):
    (tmp_path / "text_encoder_2").mkdir()
    (tmp_path / "tokenizer_2").symlink_to(repo / "tokenizer_2")
    with pytest.raises(UserError, match=r"Could not load the T5 text encoder from the local directory"):
        load_text_embedder("t5", tmp_path, "text_encoder_2", "tokenizer_2", 8, "cpu", torch.float32)


def test_a_cut_weights_shard_is_a_user_error(tmp_path, repo):
    (tmp_path / "tokenizer_2").symlink_to(repo / "tokenizer_2")
    shutil.copytree(repo / "text_encoder_2", tmp_path / "text_encoder_2")
    shard = tmp_path / "text_encoder_2" / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # a download cut short
    with pytest.raises(
        UserError, match=r"Could not load the T5 text encoder from the local directory .*Safet"
    ):
        load_text_embedder("t5", tmp_path, "text_encoder_2", "tokenizer_2", 8, "cpu", torch.float32)


def test_nonexistent_path_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("sent to the hub"))
    for path in (tmp_path / "nope", "./no-such-dir", "~/no-such-dir"):  # paths, not repo ids
        with pytest.raises(UserError, match="neither an existing directory nor a hub repo id"):
            load_text_embedder("t5", path, "text_encoder_2", "tokenizer_2", 8, "cpu", torch.float32)


def test_a_hub_repo_is_fetched_for_its_two_subfolders_only(repo, monkeypatch):
    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    t5 = load_text_embedder("t5", "org/name", "text_encoder_2", "tokenizer_2", 8, "cpu", torch.float32)
    assert asked == {"repo_id": "org/name", "allow_patterns": ["text_encoder_2/*", "tokenizer_2/*"]}
    assert t5(["a cat"]).shape == (1, 8, SPEC.params.context_in_dim)


def test_the_encoder_is_moved_to_the_device_asked_for(repo):
    t5 = load_text_embedder("t5", repo, "text_encoder_2", "tokenizer_2", 8, "meta", torch.float32)
    assert t5.device.type == "meta" and {p.device.type for p in t5.parameters()} == {"meta"}


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    from huggingface_hub import utils as hub_utils

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    yield
    # huggingface_hub < 1.0 caches its HTTP session with an "offline" adapter: drop it, or every later
    # test in this process would be offline too.
    reset_sessions = getattr(hub_utils, "reset_sessions", None)
    if reset_sessions is not None:
        reset_sessions()


OFFLINE_HINT = (
    "If you are offline or HF_HUB_OFFLINE is set, the files must already be in the Hugging Face cache"
)


def test_hub_repo_missing_offline_is_a_user_error(offline_hub, tmp_path, repo):
    (tmp_path / "text_encoder_2").mkdir()
    (tmp_path / "tokenizer_2").symlink_to(repo / "tokenizer_2")
    with pytest.raises(UserError) as local:  # a local folder: the hub is not to blame
        load_text_embedder("t5", tmp_path, "text_encoder_2", "tokenizer_2", 8, "cpu", torch.float32)
    assert OFFLINE_HINT not in str(local.value)
    with pytest.raises(UserError, match=r"hub repo flux-intermediate-representation/absent.*" + OFFLINE_HINT):
        load_text_embedder(
            "t5",
            "flux-intermediate-representation/absent",
            "text_encoder_2",
            "tokenizer_2",
            8,
            "cpu",
            torch.float32,
        )


@pytest.mark.parametrize("error_name", ["GatedRepoError", "RepositoryNotFoundError", "EntryNotFoundError"])
def test_hub_errors_become_user_errors(monkeypatch, error_name):
    from huggingface_hub import utils as hub_utils

    error_cls = getattr(hub_utils, error_name)

    message = f"{error_name} for black-forest-labs/FLUX.1-schnell"
    try:
        error = error_cls(message)
    except TypeError:  # newer huggingface_hub: HTTP errors carry the HTTP response
        error = error_cls(message, response=SimpleNamespace(headers={}, request=None))

    def refuse(*args, **kwargs):
        raise error

    # Hub sources are fetched with snapshot_download (only the two subfolders) before loading from disk.
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(UserError) as info:
        load_text_embedder(
            "clip", "black-forest-labs/FLUX.1-schnell", "text_encoder", "tokenizer", 77, "cpu", None
        )
    message = str(info.value)
    download = message.split("download them once with `")[1].split(" ")
    assert download[0] == command_name() and download[2] == "black-forest-labs/FLUX.1-schnell"
    if error_name == "GatedRepoError":
        assert "HF_TOKEN" in message and "licence" in message


def test_our_bugs_stay_loud(monkeypatch, repo):
    import transformers

    def bug(*args, **kwargs):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", bug)
    with pytest.raises(KeyError):
        load_text_embedder("clip", repo, "text_encoder", "tokenizer", 77, "cpu", None)


def test_kind_is_explicit(repo):
    with pytest.raises(ValueError, match="kind"):
        load_text_embedder("openai", repo, "text_encoder", "tokenizer", 77, "cpu", torch.float32)
    assert flux.conditioner.KINDS == ("t5", "clip")


def test_checkpoint_missing_weights_is_a_user_error(repo, tmp_path):
    (tmp_path / "tokenizer").symlink_to(repo / "tokenizer")
    (tmp_path / "text_encoder").mkdir()
    shutil.copy(repo / "text_encoder" / "config.json", tmp_path / "text_encoder")
    state = load_file(repo / "text_encoder" / "model.safetensors")
    del state["text_model.final_layer_norm.weight"]
    save_file(state, tmp_path / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks 1 weights.*final_layer_norm\.weight"):
        load_text_embedder("clip", tmp_path, "text_encoder", "tokenizer", 77, "cpu", torch.float32)


def command_name() -> str:
    """huggingface_hub's command, as installed beside this Python (its version decides the name)."""
    from importlib.metadata import distribution

    scripts = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    return "hf" if "hf" in scripts else "huggingface-cli"


def test_the_commands_errors_name_are_installed():
    """Every "run this" in an error names the command that this huggingface_hub installs: 1.x has no
    `huggingface-cli`, and 0.25 (the lowest allowed) no `hf`."""
    from flux.loading import hub_command

    assert hub_command("login").split()[0] == hub_command("download x").split()[0] == command_name()
    assert Path(sys.executable).with_name(command_name()).is_file()
    assert hub_command("login") == ("hf auth login" if command_name() == "hf" else "huggingface-cli login")
