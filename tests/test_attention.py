"""Attention maps (flux.attention) on flux-tiny captures, on the CPU in float32.

The maps are checked against attention worked out here from the blocks' weights: modulation, qkv, RMS
norm, RoPE in its complex form, softmax. That reconstruction is itself checked against the attention output
the model's own output projection receives.
"""

import math

import pytest
import torch
from PIL import Image

import capture_sample
from flux.attention import (
    HEAT,
    AttentionMaps,
    AttentionRecorder,
    attention_maps,
    share_label,
    step_sheet,
    text_attention,
)
from flux.capture import CapturePlan
from flux.errors import UsageError, UserError
from flux.interventions import replay
from flux.pipeline import RunOptions, generate, load_models
from flux.prompt_tokens import select_tokens
from flux.store import load_capture

WIDTH, HEIGHT = 64, 48  # a 4 x 3 grid of image tokens


@pytest.fixture(scope="module")
def models():
    return load_models(RunOptions(model="flux-tiny").spec, "cpu")


def _capture(models, folder, fmt="pt"):
    opts = RunOptions(
        model="flux-tiny",
        prompt="a red fox",
        seed=3,
        output_dir=str(folder),
        should_decode_intermediates=False,
        width=WIDTH,
        height=HEIGHT,
        format=fmt,
    ).validate()
    return generate(models, opts, progress=False).capture_path


@pytest.fixture(scope="module")
def capture_path(models, tmp_path_factory):
    return _capture(models, tmp_path_factory.mktemp("attention"))


# ------------------------------------------------------------------ attention worked out from the weights
def _layer_norm(x):
    x = x.double()
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)


def _heads(qkv, n_heads):
    """(B, N, 3 * D) -> q, k, v each (B, H, N, D / H), as the checkpoint's qkv rows are ordered."""
    b, n, three_d = qkv.shape
    return qkv.view(b, n, 3, n_heads, three_d // 3 // n_heads).permute(2, 0, 3, 1, 4)


def _rms(x, scale):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale.double()


def _rotate(x, ids, axes_dim, theta):
    """RoPE as a complex rotation: channel pair (2j, 2j+1) is x_2j + i x_2j+1, turned by an angle of
    pos * theta^(-2k / d) for pair k of an axis of d channels."""
    angles = torch.cat(
        [
            ids[..., a, None].double() * theta ** (-torch.arange(0, d, 2).double() / d)
            for a, d in enumerate(axes_dim)
        ],
        dim=-1,
    )  # (B, N, D / 2)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def _attention_probabilities(q, k, ids, params):
    q, k = (_rotate(t, ids, params.axes_dim, params.theta) for t in (q, k))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, N, N)


def _linear(layer, x):
    return torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())


def _modulated(x, mod, vec, n_chunks):
    shift, scale = _linear(mod.lin, torch.nn.functional.silu(vec.double()))[:, None].chunk(n_chunks, dim=-1)[
        :2
    ]
    return (1 + scale) * _layer_norm(x) + shift


def _double_qkv(block, img, txt, vec, n_heads):
    out = []
    for x, mod, attn in ((txt, block.txt_mod, block.txt_attn), (img, block.img_mod, block.img_attn)):
        q, k, v = _heads(_linear(attn.qkv, _modulated(x, mod, vec, 6)), n_heads)
        out.append((_rms(q, attn.norm.query_norm.scale), _rms(k, attn.norm.key_norm.scale), v))
    return (torch.cat(parts, dim=2) for parts in zip(*out))  # text first


def _single_qkv(block, x, vec, n_heads):
    h = _linear(block.linear1, _modulated(x, block.modulation, vec, 3))[..., : 3 * x.shape[-1]]
    q, k, v = _heads(h, n_heads)
    return _rms(q, block.norm.query_norm.scale), _rms(k, block.norm.key_norm.scale), v


def test_the_maps_are_the_attention_worked_out_from_the_weights(models, capture_path):
    flow = models.flow
    capture = load_capture(capture_path)
    ctx = capture["denoising_context"]
    txt_len, ids = int(ctx["txt_seq_len"]), torch.cat((ctx["txt_ids"], ctx["img_ids"]), dim=1)
    plan = CapturePlan(double=(1,), single=(2,), steps=(1, 2))
    positions = [1, 3, 6, 20]  # '▁red', 'f', '</s>', and a padding position
    seen: dict = {}  # (block, "in" or "attn") -> per step replayed (1, then 2): inputs, or what the
    # output projection received

    def inputs(name):
        def hook(_module, args, kwargs):
            given = (*args, *(kwargs[k] for k in ("img", "txt") if k in kwargs), kwargs["vec"])
            seen.setdefault((name, "in"), []).append(given)

        return hook

    def projected(name, width=None):
        def hook(_module, args):
            seen.setdefault((name, "attn"), []).append(args[0][..., :width] if width else args[0])

        return hook

    double, single = flow.double_blocks[1], flow.single_blocks[2]
    handles = [
        double.register_forward_pre_hook(inputs("double"), with_kwargs=True),
        single.register_forward_pre_hook(inputs("single"), with_kwargs=True),
        double.img_attn.proj.register_forward_pre_hook(projected("double")),
        single.linear2.register_forward_pre_hook(projected("single", flow.hidden_size)),
    ]
    try:
        maps = attention_maps(flow, capture, plan, positions)
    finally:
        for handle in handles:
            handle.remove()

    assert maps.maps.shape == (2, 2, 1, 4, HEIGHT // 16, WIDTH // 16)
    assert maps.tokens == ["▁red", "f", "</s>", "<pad>"] and maps.blocks == [
        "double_blocks.1",
        "single_blocks.2",
    ]
    with torch.no_grad():
        for step in (1, 2):
            for name, block in (("double", double), ("single", single)):
                if name == "double":
                    img, txt, vec = seen[(name, "in")][step - 1]
                    q, k, v = _double_qkv(block, img, txt, vec, flow.num_heads)
                else:
                    x, vec = seen[(name, "in")][step - 1]
                    q, k, v = _single_qkv(block, x, vec, flow.num_heads)
                p = _attention_probabilities(q, k, ids, flow.params)
                # The reconstruction is the model's attention: its output is what the projection received.
                out = (p @ v).transpose(1, 2).flatten(2)  # (B, N, D)
                got = seen[(name, "attn")][step - 1]
                torch.testing.assert_close(out[:, -got.shape[1] :].float(), got, atol=2e-5, rtol=1e-4)
                expected = p[:, :, txt_len:, positions].mean(dim=1).transpose(1, 2)  # (B, N, L)
                measured = maps.get(f"{name}_blocks.{'1' if name == 'double' else '2'}", step, 1)
                torch.testing.assert_close(measured.flatten(-2), expected[:, 0].float(), atol=1e-6, rtol=1e-5)
                s, b = (1, 2).index(step), ("double", "single").index(name)
                torch.testing.assert_close(
                    maps.maps[s, b].flatten(-2), expected.float(), atol=1e-6, rtol=1e-5
                )
    # A share of one patch's attention: between 0 and 1, and over every text token, less than the whole.
    everything = attention_maps(flow, capture, plan, range(txt_len)).maps
    assert (everything >= 0).all() and (everything.sum(dim=3) < 1).all()


def test_chunked_scores_are_the_same_as_whole_ones(models):
    torch.manual_seed(0)
    b, h, t, n, d = 2, 2, 5, 17, 32  # flux-tiny's head width, so its RoPE fits
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    ids = torch.zeros(b, n, 3)
    ids[..., 1] = torch.arange(n)
    pe = models.flow.pe_embedder(ids)
    whole = text_attention(q, k, pe, t, [0, 4])
    one_query_at_a_time = text_attention(q, k, pe, t, [0, 4], budget=1)
    assert whole.shape == (b, 2, n - t)
    torch.testing.assert_close(
        one_query_at_a_time, whole, atol=1e-7, rtol=1e-6
    )  # BLAS may sum in another order


def test_bf16_scores_are_those_of_the_rounded_rotated_q_and_k(models):
    """The real models run in bf16: the block's attention rotates q and k in float32 and rounds them to
    bf16 before the scores. The maps must see those rounded q and k, not q and k rotated without rounding
    (that differs by up to ~10% where the attention is sharp)."""
    flow, params = models.flow, models.flow.params
    torch.manual_seed(0)
    b, h, t, side = 1, 2, 8, 6
    n, d = t + side * side, sum(params.axes_dim)
    ids = torch.zeros(b, n, 3)
    ids[0, t:, 1], ids[0, t:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    # After QK-norm: each head's channels have an RMS of its scale (4: a sharp attention).
    q, k = (4 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) for x in torch.randn(2, b, h, n, d))
    q, k = q.bfloat16(), k.bfloat16()
    rotated = [_rotate(x.double(), ids, params.axes_dim, params.theta).bfloat16().double() for x in (q, k)]
    p = torch.softmax(rotated[0] @ rotated[1].transpose(-1, -2) / math.sqrt(d), dim=-1)
    expected = p[:, :, t:, [0, 3, 7]].mean(dim=1).transpose(1, 2)
    measured = text_attention(q, k, flow.pe_embedder(ids), t, [0, 3, 7])
    assert measured.dtype == torch.float32
    torch.testing.assert_close(measured.double(), expected, atol=0, rtol=1e-3)


def test_measuring_leaves_the_run_unchanged_and_no_hook_behind(models, capture_path):
    flow = models.flow
    capture = load_capture(capture_path)
    maps = attention_maps(flow, capture)  # every block, step and prompt token
    assert torch.equal(maps.replay.latent, capture["denoising_context"]["final_latent"])
    assert maps.maps.shape[:4] == (4, 5, 1, len(capture["metadata"]["t5_tokens"]))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in flow.modules())

    # Outside a replay nobody sets the step: the hook refuses to guess, and the hooks still come off.
    recorder = AttentionRecorder(
        flow, ["single_blocks.0"], [0], int(capture["denoising_context"]["txt_seq_len"]), [0]
    )
    with pytest.raises(UsageError, match="step is not set"), recorder:
        replay(flow, capture, stop=0)
    assert all(not m._forward_hooks for m in flow.modules())


def test_an_interrupted_capture_is_measured_from_its_last_step_on_disk(models, capture_path, tmp_path):
    calls = []

    def interrupt_the_last_step(_module, _args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    handle = models.flow.register_forward_pre_hook(interrupt_the_last_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            _capture(models, tmp_path, fmt="safetensors")
    finally:
        handle.remove()
    cut = load_capture(next((tmp_path / "intermediates").glob("capture_*")))
    assert len(cut["denoising_context"]["img_state"]) == 3 and "final_latent" not in cut["denoising_context"]
    plan = CapturePlan(double=(1,), single=(0,), steps=(3,))  # past the steps on disk: replayed from step 2
    full = attention_maps(models.flow, load_capture(capture_path), plan)
    assert torch.equal(attention_maps(models.flow, cut, plan).maps, full.maps)


def test_a_step_sheet_shows_each_map_of_its_step_scaled_to_its_maximum(models, capture_path):
    from flux.decode import LABEL_H, LABEL_W, PAD

    plan = CapturePlan(double=(0,), single=(2,), steps=(0, 3))
    maps = attention_maps(models.flow, load_capture(capture_path), plan, [1, 3, 6])
    cell_w, cell_h = 8 * (WIDTH // 16), 8 * (HEIGHT // 16)  # 8 x 8 pixels for each image token
    sheet = step_sheet(maps, 1, Image.new("RGB", (WIDTH, HEIGHT)), (cell_w, cell_h))  # step 3
    for b in range(2):
        for n in range(3):
            row, col = divmod(int(maps.maps[1, b, 0, n].argmax()), WIDTH // 16)  # its brightest image token
            x, y = LABEL_W + n * (cell_w + PAD) + 8 * col + 4, LABEL_H + b * (cell_h + PAD) + 8 * row + 4
            assert sheet.getpixel((x, y)) == tuple(int(c) for c in HEAT[-1])
    # Cells wide enough carry their map's largest share, white on a black box in the top left corner; the
    # narrow ones above do not (their corner is a map's colour).
    assert sheet.getpixel((LABEL_W, LABEL_H)) != (0, 0, 0)
    wide = step_sheet(maps, 1, Image.new("RGB", (WIDTH, HEIGHT)), (64, 48))
    for b in range(2):
        for n in range(3):
            x, y = LABEL_W + n * (64 + PAD), LABEL_H + b * (48 + PAD)
            box = [wide.getpixel((x + i, y + j)) for i in range(20) for j in range(12)]
            assert wide.getpixel((x, y)) == (0, 0, 0) and max(min(p) for p in box) > 200  # white text


def test_a_safetensors_capture_gives_the_same_maps(models, capture_path, tmp_path):
    lazy = load_capture(_capture(models, tmp_path, fmt="safetensors"))
    plan = CapturePlan(double=(0,), single=(1,), steps=(3,))
    eager = attention_maps(models.flow, load_capture(capture_path), plan)
    assert torch.equal(attention_maps(models.flow, lazy, plan).maps, eager.maps)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (None, [0, 1, 2, 3, 4, 5, 6]),
        ("all", [0, 1, 2, 3, 4, 5, 6]),
        ("fox", [2, 3, 4, 5]),  # spelled by four tokens: '▁', 'f', 'o', 'x'
        ("FOX,red", [2, 3, 4, 5, 1]),  # in the order named; case ignored
        ("0-1,red", [0, 1]),  # a position named twice counts once
        (7, [7]),  # Fire's int
        ((0, 30), [0, 30]),  # Fire's tuple; padding positions may be named
    ],
)
def test_tokens_are_selected_by_word_or_position(tokens, expected):
    prompt = ["▁a", "▁red", "▁", "f", "o", "x", "</s>"]
    assert select_tokens(tokens, prompt, 32) == expected


def test_punctuation_after_a_word_is_not_part_of_it():
    # T5's tokens of "A red fox, a red fox." and of "don't sci-fi 3d"
    prompt = ["▁", "A", "▁red", "▁", "f", "o", "x", ",", "▁a", "▁red", "▁", "f", "o", "x", ".", "</s>"]
    assert select_tokens("fox", prompt, 32) == [3, 4, 5, 6, 10, 11, 12, 13]  # every place it stands
    assert select_tokens("fox.", prompt, 32) == [10, 11, 12, 13, 14]
    assert select_tokens("fox,", prompt, 32) == select_tokens("fox", prompt, 32)  # a trailing comma: nothing
    assert select_tokens("a", prompt, 32) == [0, 1, 8]  # 'A' at the start is '▁', 'A'
    prompt = ["▁don", "'", "t", "▁sci", "-", "fi", "▁3", "d", "</s>"]
    assert select_tokens("don't,sci-fi,3d", prompt, 16) == [0, 1, 2, 3, 4, 5, 6, 7]
    for part in ("don", "sci"):
        with pytest.raises(UsageError, match="is not a word of the prompt"):
            select_tokens(part, prompt, 16)
    with pytest.raises(UsageError, match="cannot read '3-'"):
        select_tokens("3-", prompt, 16)


def test_a_number_that_is_also_a_word_is_not_taken_silently_for_a_position():
    prompt = ["▁", "3", "▁dogs", "▁in", "▁1984", "</s>"]  # T5's tokens of "3 dogs in 1984"
    with pytest.raises(
        UsageError, match=r"'3' is both text position 3 and a word of the prompt \(at positions 0-1\)"
    ):
        select_tokens("3", prompt, 32)
    with pytest.raises(UsageError, match="both text position 3"):
        select_tokens(3, prompt, 32)  # Fire's int
    assert select_tokens("3-3", prompt, 32) == [3]  # the position, written as a range
    assert select_tokens("0-1", prompt, 32) == [0, 1]  # the word, by its positions
    assert select_tokens("1984", prompt, 32) == [4]  # no position 1984: the word
    assert select_tokens("4", prompt, 32) == [4]  # not a word of this prompt: the position
    with pytest.raises(UsageError, match="out of range"):
        select_tokens("1985", prompt, 32)


def test_a_phrase_asks_for_commas():
    prompt = ["▁a", "▁red", "▁", "f", "o", "x", "</s>"]
    with pytest.raises(
        UsageError, match=r"'red fox' is not one word: separate words with commas, e\.g\. --tokens red,fox"
    ):
        select_tokens("red fox", prompt, 32)


def test_a_word_is_not_spelled_across_the_start_of_the_next():
    prompt = ["▁a", "▁red", "▁", "f", "o", "x", "</s>"]
    with pytest.raises(UsageError, match="'redfox' is not a word of the prompt"):
        select_tokens("redfox", prompt, 32)
    prompt = ["▁1", "▁2", "▁dogs", "</s>"]  # "1 2 dogs": '12' is no word of it, so position 12
    assert select_tokens("12", prompt, 32) == [12]


def test_a_share_is_labelled_as_a_short_percentage():
    assert [share_label(x) for x in (0.0042, 0.073, 0.094, 0.64, 0.999, 1.0)] == [
        "0.42%",
        "7.3%",
        "9.4%",
        "64%",
        "100%",
        "100%",
    ]


def test_positions_of_a_capture_without_its_tokens_are_not_called_padding(models, capture_path):
    capture = load_capture(capture_path)
    del capture["metadata"]["t5_tokens"]  # as an older version wrote it
    plan = CapturePlan(double=(0,), single=(), steps=(0,))
    maps = attention_maps(models.flow, capture, plan, [1, 20])
    assert maps.tokens == ["?", "?"] and maps.prompt is None
    with pytest.raises(UserError, match="its words are unknown"):  # not one word of two '?'
        maps.word_maps()


def test_a_token_measured_twice_is_named_by_position():
    maps = AttentionMaps(torch.rand(1, 1, 1, 2, 3, 4), [0], ["double_blocks.0"], [2, 9], ["▁red", "▁red"])
    assert torch.equal(maps.get("double_blocks.0", 0, 9), maps.maps[0, 0, :, 1])
    with pytest.raises(KeyError, match=r"measured at text positions \[2, 9\]"):
        maps.get("double_blocks.0", 0, "▁red")
    with pytest.raises(KeyError, match=r"text position 3 is not among the measured positions \[2, 9\]"):
        maps.get("double_blocks.0", 0, 3)


def test_a_word_is_matched_whole_and_a_bad_selection_says_what_there_is():
    prompt = ["▁a", "▁red", "dish", "▁red", "</s>"]
    assert select_tokens("red", prompt, 8) == [3]  # not the start of 'reddish'
    assert select_tokens("reddish", prompt, 8) == [1, 2]
    with pytest.raises(UsageError, match=r"'fox' is not a word of the prompt.*0:▁a, 1:▁red"):
        select_tokens("fox", prompt, 8)
    with pytest.raises(UsageError, match="out of range: text positions go from 0 to 7"):
        select_tokens("8", prompt, 8)
    with pytest.raises(UserError, match="does not record its prompt's T5 tokens"):
        select_tokens(None, None, 8)


def test_measured_tokens_are_grouped_into_the_words_they_spell():
    """As --tokens reads words: a word runs from a token T5 marks as beginning one ('▁') to the next such
    token, a special token or punctuation that ends it; a gap in the positions also ends it."""
    from flux.attention import word_groups

    tokens = ["▁a", "▁red", "▁", "f", "o", "x", ",", "▁don", "'", "t", "</s>", "<pad>", "<pad>"]
    assert word_groups(list(range(len(tokens))), tokens) == [
        ("a", [0]),
        ("red", [1]),
        ("fox", [2, 3, 4, 5]),
        (",", [6]),
        ("don't", [7, 8, 9]),
        ("</s>", [10]),
        ("<pad>", [11]),
        ("<pad>", [12]),
    ]
    # Measured out of order or with gaps (--tokens fox,0-0): only neighbouring positions join.
    assert word_groups([2, 3, 4, 5, 0, 9], ["▁", "f", "o", "x", "▁a", "t"]) == [
        ("fox", [0, 1, 2, 3]),
        ("a", [4]),
        ("t", [5]),
    ]
    # Whether punctuation ends a word is read from the prompt where known: "don'" of "don't" is part of one
    # word, as --tokens reads it; without the prompt, from the measured tokens, never across a gap.
    assert word_groups([7, 8], tokens[7:9], prompt=tokens) == [("don'", [0, 1])]
    assert word_groups([7, 8, 20], [*tokens[7:9], "<pad>"]) == [("don", [0]), ("'", [1]), ("<pad>", [2])]
    assert word_groups([], []) == []


def test_word_maps_sum_the_maps_of_each_words_tokens():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 1, 5, 4, 6, generator=g)  # (steps, blocks, batch, tokens, h, w)
    measured = AttentionMaps(
        maps, [0, 2], ["double_blocks.0", "single_blocks.0", "single_blocks.1"], [1, 2, 3, 4, 5],
        ["▁red", "▁", "f", "o", "x"],
    )  # fmt: skip
    words, summed = measured.word_maps()
    assert words == [("red", [1]), ("fox", [2, 3, 4, 5])]
    assert summed.shape == (2, 3, 1, 2, 4, 6)
    assert torch.equal(summed[:, :, :, 0], maps[:, :, :, 0])
    assert torch.allclose(
        summed[:, :, :, 1], maps[:, :, :, 1] + maps[:, :, :, 2] + maps[:, :, :, 3] + maps[:, :, :, 4]
    )
    # A batch of two, a word's tokens measured out of order, and nothing measured.
    maps = torch.rand(1, 1, 2, 3, 2, 2, generator=g)
    measured = AttentionMaps(maps, [0], ["double_blocks.0"], [4, 2, 3], ["▁a", "▁", "b"])
    words, summed = measured.word_maps()
    assert words == [("a", [4]), ("b", [2, 3])]
    assert torch.equal(summed[:, :, :, 0], maps[:, :, :, 0])
    assert torch.allclose(summed[:, :, :, 1], maps[:, :, :, 1] + maps[:, :, :, 2])
    nothing = AttentionMaps(torch.rand(1, 1, 1, 0, 2, 2), [0], ["double_blocks.0"], [], [], prompt=[])
    assert nothing.word_maps()[0] == [] and nothing.word_maps()[1].shape == (1, 1, 1, 0, 2, 2)


# ------------------------------------------------------------------------------------------------ the CLI
def _cli(*args) -> int:
    return capture_sample.run(["attention", *map(str, args), "--device", "cpu", "--progress", "False"])


def test_the_command_writes_maps_sheets_and_shares_and_never_overwrites(
    models, capture_path, tmp_path, capsys
):
    out = tmp_path / "att"
    argv = (
        capture_path,
        "--tokens",
        "fox",
        "--steps",
        "0,3",
        "--blocks",
        "double:1,single:0",
        "--output_dir",
        out,
    )
    assert _cli(*argv) == 0
    assert f"Attention: {out} (steps 0,3; tokens 2:▁, 3:f, 4:o, 5:x)" in capsys.readouterr().out
    saved = torch.load(out / "attention.pt", weights_only=True)  # plain tensors, lists and strings
    assert saved["steps"] == [0, 3] and saved["positions"] == [2, 3, 4, 5]
    assert saved["metadata"]["capture"] == str(capture_path.resolve())
    plan = CapturePlan(double=(1,), single=(0,), steps=(0, 3))
    assert torch.equal(
        saved["maps"], attention_maps(models.flow, load_capture(capture_path), plan, [2, 3, 4, 5]).maps
    )
    loaded = AttentionMaps.load(out / "attention.pt")
    assert loaded.get("single_blocks.0", 3, "f").shape == (1, 3, 4)
    assert loaded.metadata["capture_metadata"]["prompt"] == "a red fox"  # which run the maps are of
    # From Python, the same words name the same tokens.
    by_word = attention_maps(models.flow, load_capture(capture_path), plan, "fox")
    assert by_word.positions == [2, 3, 4, 5] and torch.equal(by_word.maps, saved["maps"])
    assert attention_maps(models.flow, load_capture(capture_path), plan, ["red", 0]).positions == [1, 0]

    rows = (out / "shares.csv").read_text().splitlines()
    assert rows[0] == "step,block,position,token,mean_share,max_share" and len(rows) == 1 + 2 * 2 * 4
    step, block, position, token, mean, top = rows[1 + 8 + 4 + 1].split(",")  # step 3, single 0, 'f'
    m = saved["maps"][1, 1, 0, 1]
    assert (step, block, position, token) == ("3", "single_blocks.0", "3", "f")
    assert float(mean) == pytest.approx(float(m.mean()), rel=1e-5) and float(top) == pytest.approx(
        float(m.max()), rel=1e-5
    )

    # The word's row: its four tokens' maps summed, as one share of each patch's attention.
    rows = (out / "words.csv").read_text().splitlines()
    assert rows[0] == "step,block,word,positions,mean_share,max_share" and len(rows) == 1 + 2 * 2
    step, block, word, positions, mean, top = rows[4].split(",")  # step 3, single 0
    m = saved["maps"][1, 1, 0].sum(dim=0)
    assert (step, block, word, positions) == ("3", "single_blocks.0", "fox", "2-5")
    assert float(mean) == pytest.approx(float(m.mean()), rel=1e-5)
    assert float(top) == pytest.approx(float(m.max()), rel=1e-5)

    for step in (0, 3):  # blocks down, tokens across, the image last: 2 rows of 4 cells and the final one
        from flux.decode import cell_size, grid_size

        assert Image.open(out / f"step_{step}.jpg").size == grid_size(2, 4, *cell_size(WIDTH, HEIGHT, 96))
    assert _cli(*argv) == 0  # the same again: a new folder beside the first
    assert (tmp_path / "att_1" / "attention.pt").is_file() and torch.equal(
        torch.load(tmp_path / "att_1" / "attention.pt", weights_only=True)["maps"], saved["maps"]
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tokens", "dog"], "'dog' is not a word of the prompt"),
        (["--steps", "4"], "--steps: '4' is out of range"),
        (["--blocks", "double:2"], "--blocks"),
        (["--tokens", "99"], "out of range: text positions go from 0 to 31"),
    ],
)
def test_bad_flags_are_refused_before_any_model_loads(
    capture_path, tmp_path, flags, message, monkeypatch, capsys
):
    import flux.sweep

    monkeypatch.setattr(flux.sweep, "load_for_replay", lambda *a, **k: pytest.fail("the models were loaded"))
    assert _cli(capture_path, *flags, "--output_dir", tmp_path / "o") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_default_folder_is_beside_the_capture(capture_path, capsys):
    assert _cli(capture_path, "--steps", "3", "--tokens", "red", "--blocks", "single:2") == 0
    folder = capture_path.parent / "attention" / capture_path.stem
    assert (folder / "step_3.jpg").is_file() and f"Attention: {folder}" in capsys.readouterr().out
