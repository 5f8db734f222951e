"""The lens on flux-tiny, CPU, float32: block outputs decode to the right latents, files and sheets."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import flux.decode
import flux.loading
from flux.autoencoder import AutoEncoder
from flux.configs import TINY_AE_PARAMS, TINY_PARAMS
from flux.decode import (
    FINAL_GAP,
    LABEL_H,
    LABEL_W,
    PAD,
    block_latents,
    cell_size,
    chunk_sizes,
    decode_capture,
    decode_latents,
    grid_size,
    lens_plan,
    lens_velocity,
    load_final_layer,
    make_grid,
    save_jpeg,
    sheet_cell,
    to_image,
    to_uint8,
)
from flux.errors import UsageError, UserError
from flux.model import Flux
from flux.sampling import denoise, get_noise, get_schedule, prepare, unpack

HEIGHT, WIDTH, N_TXT, N_STEPS = 48, 64, 8, 4
N_IMG = (HEIGHT // 16) * (WIDTH // 16)


def make_capture(model: Flux, keep_steps: list[int] | None = None, seed: int = 0) -> dict:
    """Run the sampler with forward hooks, building a capture dict as docs/capture_format.md lays it out."""
    gen = torch.Generator().manual_seed(seed)
    txt = torch.randn(1, N_TXT, TINY_PARAMS.context_in_dim, generator=gen)
    y = torch.randn(1, TINY_PARAMS.vec_in_dim, generator=gen)
    inp = prepare(get_noise(1, HEIGHT, WIDTH, "cpu", torch.float32, seed), txt, y)
    timesteps = get_schedule(N_STEPS, inp["img"].shape[1])
    keep = list(range(N_STEPS)) if keep_steps is None else keep_steps
    doubles = {f"block_{i}": [] for i in range(len(model.double_blocks))}
    singles = {f"block_{i}": [] for i in range(len(model.single_blocks))}
    ctx = {"img_state": [], "timestep_pairs": [], "vec": [], "pred": []}
    step = [0]
    guidance = 3.5

    def before_step(info):
        step[0] = info.index
        t_vec = torch.full((1,), info.t_curr)
        ctx["img_state"].append(info.img.clone())
        ctx["timestep_pairs"].append((info.t_curr, info.t_prev))
        ctx["vec"].append(model.conditioning(t_vec, y, torch.full((1,), guidance)))

    def hook(store, name):
        def fn(_module, _args, out):
            if step[0] in keep:
                store[name].append(tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone())

        return fn

    handles = [
        b.register_forward_hook(hook(doubles, f"block_{i}")) for i, b in enumerate(model.double_blocks)
    ]
    handles += [
        b.register_forward_hook(hook(singles, f"block_{i}")) for i, b in enumerate(model.single_blocks)
    ]
    handles.append(
        model.final_layer.register_forward_hook(lambda _m, _a, out: ctx["pred"].append(out.clone()))
    )
    try:
        with torch.inference_mode():
            final = denoise(model, **inp, timesteps=timesteps, guidance=guidance, before_step=before_step)
    finally:
        for h in handles:
            h.remove()
    ctx |= {"y": y, "txt": inp["txt"], "txt_ids": inp["txt_ids"], "img_ids": inp["img_ids"]}
    ctx |= {"txt_seq_len": N_TXT, "guidance": guidance, "final_latent": final}
    meta = {
        "model": "flux-tiny",
        "height": HEIGHT,
        "width": WIDTH,
        "num_steps": N_STEPS,
        "timesteps": timesteps,
        "captured_steps": keep,
        "captured_blocks": {"double": list(range(len(doubles))), "single": list(range(len(singles)))},
        "streams": "both",
        "dtype": "float32",
        "capture_dtype": "float32",
        "schema_version": 1,
    }
    return {"double_blocks": doubles, "single_blocks": singles, "denoising_context": ctx, "metadata": meta}


@pytest.fixture(scope="module")
def model() -> Flux:
    torch.manual_seed(0)
    return Flux(TINY_PARAMS).eval()


@pytest.fixture(scope="module")
def ae() -> AutoEncoder:
    torch.manual_seed(1)
    return AutoEncoder(TINY_AE_PARAMS).eval()


@pytest.fixture(scope="module")
def capture(model) -> dict:
    return make_capture(model)


def test_last_block_at_last_step_is_the_final_latent(model, capture):
    last = len(model.single_blocks) - 1
    final = capture["denoising_context"]["final_latent"]
    for target in ("x0", "next"):
        [(key, latent)] = block_latents(capture, model.final_layer, target, {"single": [last]}, [N_STEPS - 1])
        assert (key.stream, key.block, key.step) == ("single", last, N_STEPS - 1)
        assert latent.dtype == final.dtype
        assert torch.equal(latent, final)


def test_the_last_blocks_velocity_is_the_models_own_prediction_at_every_step(model, capture):
    """The final layer reads the last single block's image tokens exactly as the model's forward does."""
    last = len(model.single_blocks) - 1
    for step in range(N_STEPS):
        [key] = lens_plan(capture, {"single": [last]}, [step])
        velocity = lens_velocity(capture, key, model.final_layer)
        assert velocity.shape == (1, N_IMG, 64)
        assert torch.equal(velocity, capture["denoising_context"]["pred"][step])


def _final_layer_by_hand(layer, h, vec):
    mod = F.linear(F.silu(vec), layer.adaLN_modulation[1].weight, layer.adaLN_modulation[1].bias)
    shift, scale = mod[:, : h.shape[-1]], mod[:, h.shape[-1] :]
    x = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    return x @ layer.linear.weight.T + layer.linear.bias


@pytest.mark.parametrize(("stream", "block", "step"), [("double", 1, 0), ("single", 0, 0), ("single", 1, 2)])
def test_x0_and_next_match_a_hand_computation(model, capture, stream, block, step):
    ctx = capture["denoising_context"]
    h = capture[f"{stream}_blocks"][f"block_{block}"][step]
    h_img = h[0] if stream == "double" else h[:, N_TXT:]
    assert h_img.shape == (1, N_IMG, TINY_PARAMS.hidden_size)
    pred = _final_layer_by_hand(model.final_layer, h_img, ctx["vec"][step])
    t_curr, t_prev = ctx["timestep_pairs"][step]
    assert t_curr > 0.5  # a noisy step: x0 and next differ visibly
    img = ctx["img_state"][step]
    [(_, x0)] = block_latents(capture, model.final_layer, "x0", {stream: [block]}, [step])
    [(_, nxt)] = block_latents(capture, model.final_layer, "next", {stream: [block]}, [step])
    [key] = lens_plan(capture, {stream: [block]}, [step])
    torch.testing.assert_close(lens_velocity(capture, key, model.final_layer), pred, rtol=0, atol=1e-5)
    torch.testing.assert_close(x0, img - t_curr * pred, rtol=0, atol=1e-5)
    torch.testing.assert_close(nxt, img - (t_curr - t_prev) * pred, rtol=0, atol=1e-5)
    assert not torch.allclose(x0, nxt)


def test_single_entries_holding_only_image_tokens(model, capture):
    img_only = dict(capture)
    img_only["single_blocks"] = {
        k: [x[:, N_TXT:].clone() for x in v] for k, v in capture["single_blocks"].items()
    }
    img_only["metadata"] = capture["metadata"] | {"streams": "img"}
    full = dict(block_latents(capture, model.final_layer, blocks={"single": [0, 2]}))
    sliced = dict(block_latents(img_only, model.final_layer, blocks={"single": [0, 2]}))
    assert full.keys() == sliced.keys() and len(full) == 2 * N_STEPS
    for key in full:
        assert torch.equal(full[key], sliced[key])


def test_the_lens_records_no_autograd_graph(model, ae, capture, tmp_path, monkeypatch):
    """Models built in a notebook (as these fixtures are) require gradients; the lens must not keep their
    activations for a backward pass, which at 1024 px takes tens of GB."""
    assert any(p.requires_grad for p in ae.parameters())
    seen = []
    real = flux.decode.decode_latents

    def spy(latents, *args, **kwargs):
        images = real(latents, *args, **kwargs)
        seen.append((torch.is_inference_mode_enabled(), latents.requires_grad, images.requires_grad))
        return images

    monkeypatch.setattr(flux.decode, "decode_latents", spy)
    decode_capture(
        capture, model.final_layer, ae, tmp_path, blocks={"single": [0]}, steps=[0], progress=False
    )
    assert seen and all(entry == (True, False, False) for entry in seen)


def test_plan_rejects_what_was_not_captured(capture):
    with pytest.raises(UserError, match=r"Steps \[7\]"):
        lens_plan(capture, steps=[7])
    with pytest.raises(UserError, match=r"single blocks \[9\]"):
        lens_plan(capture, blocks={"single": [9]})
    with pytest.raises(ValueError, match="target"):
        next(block_latents(capture, torch.nn.Identity(), "x1"))


def test_plan_takes_indices_as_a_notebook_has_them(capture):
    """One index or many; ints, numpy ints or integer tensors: the same keys. Anything else: a clear error."""
    expected = lens_plan(capture, blocks={"single": [2]}, steps=[0, 1])
    assert [(k.stream, k.block, k.step) for k in expected] == [("single", 2, 0), ("single", 2, 1)]
    for blocks, steps in (({"single": 2}, torch.arange(2)), ({"single": np.int64(2)}, np.arange(2))):
        assert lens_plan(capture, blocks=blocks, steps=steps) == expected
    assert lens_plan(capture, blocks={"single": torch.tensor(2)}, steps=1) == expected[1:]
    assert lens_plan(capture, blocks={"single": [2]}, steps=(k for k in range(2))) == expected  # a generator
    with pytest.raises(UsageError, match="steps must be an index or a list of indices"):
        lens_plan(capture, steps=torch.tensor([True, False]))  # a mask is not a list of steps
    with pytest.raises(UsageError, match=r"steps must be an index or a list of indices; got 0\.5"):
        lens_plan(capture, steps=0.5)
    last = capture["metadata"]["num_steps"] - 1
    assert lens_plan(capture, blocks={"single": 2}, steps=-1) == lens_plan(
        capture, blocks={"single": 2}, steps=last
    )


def _files(out_dir):
    return sorted(p.name for p in out_dir.iterdir())


def _expected_names(n_double, n_single, steps, grids=True):
    names = [f"double_block_{i}_step_{k}.jpg" for i in range(n_double) for k in steps]
    names += [f"single_block_{i}_step_{k}.jpg" for i in range(n_single) for k in steps]
    return sorted([*names, "grid_double.jpg", "grid_single.jpg"] if grids else names)


def test_files_and_grids(model, ae, capture, tmp_path):
    report = decode_capture(capture, model.final_layer, ae, tmp_path, progress=False)
    n_double, n_single = len(model.double_blocks), len(model.single_blocks)
    assert _files(tmp_path) == _expected_names(n_double, n_single, range(N_STEPS))  # no temp files left
    assert report.n_images == (n_double + n_single) * N_STEPS + 1  # + the final latent
    assert sorted(p.name for p in report.files) == _expected_names(
        n_double, n_single, range(N_STEPS), grids=False
    )
    assert [p.name for p in report.grids] == ["grid_double.jpg", "grid_single.jpg"]
    assert report.compile_seconds == 0.0  # CPU: never compiled by default
    with Image.open(tmp_path / "double_block_1_step_3.jpg") as img:
        assert img.size == (WIDTH, HEIGHT) and img.mode == "RGB"
    # Cells are the full 64 x 48 images; label column, cells + padding, gap, final column.
    for name, n_rows in (("grid_double.jpg", n_double), ("grid_single.jpg", n_single)):
        with Image.open(tmp_path / name) as grid:
            expected = (
                LABEL_W + N_STEPS * (WIDTH + PAD) + FINAL_GAP + WIDTH + PAD,
                LABEL_H + n_rows * (HEIGHT + PAD),
            )
            assert grid.size == expected == grid_size(n_rows, N_STEPS, WIDTH, HEIGHT)
    # Placement: row 1, column 2 holds block 1 at step 2; the final column holds the sampler's image.
    with Image.open(tmp_path / "grid_single.jpg") as grid:
        sheet = np.asarray(grid.convert("RGB"), dtype=np.float32)
    x, y = LABEL_W + 2 * (WIDTH + PAD), LABEL_H + 1 * (HEIGHT + PAD)
    with Image.open(tmp_path / "single_block_1_step_2.jpg") as img:
        assert np.abs(sheet[y : y + HEIGHT, x : x + WIDTH] - np.asarray(img, dtype=np.float32)).mean() < 4
    # Every cell: the picture of its own block and step, closer to it than to any other block output's.
    pictures = {}
    for block in range(n_single):
        for step in range(N_STEPS):
            with Image.open(tmp_path / f"single_block_{block}_step_{step}.jpg") as img:
                pictures[block, step] = np.asarray(img, dtype=np.float32)
    for block, step in pictures:
        x, y = LABEL_W + step * (WIDTH + PAD), LABEL_H + block * (HEIGHT + PAD)
        cell = sheet[y : y + HEIGHT, x : x + WIDTH]
        distance = {key: np.abs(cell - other).mean() for key, other in pictures.items()}
        assert min(distance, key=distance.get) == (block, step)
    final_latent = capture["denoising_context"]["final_latent"]
    with torch.inference_mode():
        final = np.asarray(to_image(ae.decode(unpack(final_latent, HEIGHT, WIDTH))[0]), dtype=np.float32)
    x = LABEL_W + N_STEPS * (WIDTH + PAD) + FINAL_GAP
    assert np.abs(sheet[LABEL_H : LABEL_H + HEIGHT, x : x + WIDTH] - final).mean() < 4
    assert sheet[LABEL_H : LABEL_H + HEIGHT, x - FINAL_GAP + 2 : x - 2].min() > 240  # the white gap


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_both_sheets_end_with_the_final_image(model, ae, capture, tmp_path, monkeypatch):
    """The last column of each contact sheet is final_latent decoded. Compared exactly (in JPEG the picture
    of a block close to the end passes for it): in the single sheet the last block at the last step shows
    the same picture, in the double sheet no block does."""
    finals = []
    real = flux.decode.make_grid
    monkeypatch.setattr(flux.decode, "make_grid", lambda *a, **k: finals.append(a[4]) or real(*a, **k))
    with torch.backends.mkldnn.flags(enabled=False), torch.inference_mode():  # batch-invariant kernels
        decode_capture(capture, model.final_layer, ae, tmp_path, progress=False)
        final_latent = capture["denoising_context"]["final_latent"]
        expected = to_uint8(ae.decode(unpack(final_latent, HEIGHT, WIDTH))[0]).numpy()
    assert len(finals) == 2  # the double and the single sheet
    for final in finals:
        assert np.array_equal(np.asarray(final), expected)


@pytest.mark.parametrize("target", ["x0", "next"])
def test_each_lens_jpeg_says_what_it_shows(model, ae, capture, tmp_path, target):
    from flux.decode import lens_target

    decode_capture(capture, model.final_layer, ae, tmp_path, target=target, steps=[1], progress=False)
    with Image.open(tmp_path / "single_block_2_step_1.jpg") as img:
        assert img.info["comment"] == f"flux lens: single block 2, step 1, target {target}".encode()
    assert {lens_target(p) for p in tmp_path.glob("*_block_*.jpg")} == {target}
    assert lens_target(tmp_path / "grid_single.jpg") is None  # a contact sheet is not one block's image


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_batch_size_that_is_not_a_count_is_refused(model, ae, capture, tmp_path, batch_size):
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        decode_capture(capture, model.final_layer, ae, tmp_path, batch_size=batch_size, progress=False)
    assert not list(tmp_path.iterdir())


def test_subset_of_steps(model, ae, tmp_path):
    capture = make_capture(model, keep_steps=[0, 2])
    assert len(capture["single_blocks"]["block_0"]) == 2
    report = decode_capture(capture, model.final_layer, ae, tmp_path, progress=False, batch_size=3)
    n_double, n_single = len(model.double_blocks), len(model.single_blocks)
    assert _files(tmp_path) == _expected_names(n_double, n_single, [0, 2])
    assert report.batch_size == 3
    with Image.open(tmp_path / "grid_single.jpg") as grid:
        assert grid.size == (
            LABEL_W + 2 * (WIDTH + PAD) + FINAL_GAP + WIDTH + PAD,
            LABEL_H + n_single * (HEIGHT + PAD),
        )
    # -1 is the run's last step (3), not the last captured one (2): not captured here.
    with pytest.raises(UserError, match=r"Steps \[3\]"):
        lens_plan(capture, steps=-1)
    assert [key.step for key in lens_plan(capture, blocks={"single": [0]}, steps=-2)] == [2]
    # Step 2 is list position 1: its image is the x0 of entry 1, decoded with step 2's context.
    [(key, latent)] = block_latents(capture, model.final_layer, blocks={"double": [0]}, steps=[2])
    assert (key.step, key.position) == (2, 1)
    ctx = capture["denoising_context"]
    pred = model.final_layer(capture["double_blocks"]["block_0"][1][0], ctx["vec"][2])
    torch.testing.assert_close(latent, ctx["img_state"][2] - ctx["timestep_pairs"][2][0] * pred)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_batched_equals_one_at_a_time(model, ae, capture, tmp_path):
    # oneDNN picks convolution algorithms by batch size (last-bit differences); without it the CPU
    # kernels are batch-invariant, so any difference left would be a bookkeeping bug.
    blocks = {"double": [1], "single": [0, 2]}  # 12 block outputs + the final latent: chunks of 7 and 6
    with torch.backends.mkldnn.flags(enabled=False):
        batched = decode_capture(
            capture, model.final_layer, ae, tmp_path / "b", blocks=blocks, batch_size=7, progress=False
        )
        # ... and with one writer thread, which must run each contact sheet after its thumbnails (the sheets
        # wait for them in the same pool).
        single = decode_capture(
            capture, model.final_layer, ae, tmp_path / "s", blocks=blocks, batch_size=1, progress=False,
            workers=1,
        )  # fmt: skip
    assert (batched.batch_size, single.batch_size) == (7, 1)
    assert {p.name for p in single.grids} == {"grid_double.jpg", "grid_single.jpg"}
    assert _files(tmp_path / "b") == _files(tmp_path / "s")
    for name in _files(tmp_path / "b"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "s" / name).read_bytes(), name


def test_the_final_image_comes_first_and_each_sheet_right_after_its_stream(
    model, ae, capture, tmp_path, monkeypatch
):
    """The lens hands its pool the final image first (a column of every sheet), then the stream with more
    images, then that stream's contact sheet before any image of the other: the bigger sheet is written
    beside the decoding of the rest, and only the smaller one is left at the end."""
    submitted = []

    class Recording(flux.decode.ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            if fn is flux.decode._write_image:
                path = args[1]
                submitted.append("final" if path is None else path.name.split("_block_")[0])
            else:
                submitted.append(f"sheet {args[0]}")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(flux.decode, "ThreadPoolExecutor", Recording)
    decode_capture(capture, model.final_layer, ae, tmp_path, batch_size=5, progress=False)
    n_double, n_single = len(model.double_blocks) * N_STEPS, len(model.single_blocks) * N_STEPS
    assert n_single > n_double  # flux-tiny, as full FLUX: more single blocks
    expected = ["final", *["single"] * n_single, "sheet single", *["double"] * n_double, "sheet double"]
    assert submitted == expected


def test_batched_decode_with_default_kernels_is_within_one_level(model, ae, capture):
    latents = torch.cat(
        [lat for _, lat in block_latents(capture, model.final_layer, blocks={"single": [0, 1]})]
    )
    batched = to_uint8(decode_latents(latents, ae, HEIGHT, WIDTH)).int()
    single = torch.cat([to_uint8(decode_latents(lat[None], ae, HEIGHT, WIDTH)).int() for lat in latents])
    assert batched.shape == (2 * N_STEPS, HEIGHT, WIDTH, 3)
    assert (batched - single).abs().max() <= 1


def test_to_image_truncates_like_the_reference():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 7).expand(3, 1, 7)
    # 127.5 * (x + 1) after clamping: 0, 0, 63.75, 127.5, 254.87, 255, 255; then truncated.
    expected = np.array([0, 0, 63, 127, 254, 255, 255], dtype=np.uint8)
    img = to_image(x)
    assert img.size == (7, 1) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img)[0, :, 0], expected)
    assert np.array_equal(np.asarray(img)[0, :, 2], expected)


def test_save_jpeg_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    img = Image.new("RGB", (8, 8), "red")
    save_jpeg(img, tmp_path / "a.jpg")
    assert _files(tmp_path) == ["a.jpg"]

    def broken(tmp, final):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        save_jpeg(Image.new("RGB", (8, 8), "blue"), tmp_path / "a.jpg")
    assert _files(tmp_path) == ["a.jpg"]
    with Image.open(tmp_path / "a.jpg") as kept:
        assert kept.getpixel((4, 4))[0] > 200  # still the red one


def test_save_jpeg_writes_quality_95_without_chroma_subsampling(tmp_path):
    """Encoded straight into its file (so Pillow's encoder runs without the GIL), the JPEG is byte for byte
    what Pillow gives at quality 95 with 4:4:4 sampling, encoded in memory."""
    import io

    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    save_jpeg(img, tmp_path / "a.jpg")
    expected = io.BytesIO()
    img.save(expected, format="JPEG", quality=95, subsampling=0)
    assert (tmp_path / "a.jpg").read_bytes() == expected.getvalue()
    with Image.open(tmp_path / "a.jpg") as read:
        assert read.layer == [(1, 1, 1, 0), (2, 1, 1, 1), (3, 1, 1, 1)]  # no channel subsampled


@pytest.mark.parametrize(("steps", "cell"), [(4, 256), (50, 256), (100, 157), (1000, 12)])
def test_contact_sheets_of_many_steps_shrink_their_cells_to_stay_viewable(steps, cell, tmp_path):
    # Width of a sheet of n steps and the final image, with c-pixel cells: 56 + n (c + 4) + 16 + c + 4;
    # the biggest c <= 256 that keeps it within 16,384 pixels is (16,384 - 76 - 4 n) / (n + 1), rounded down.
    assert cell == min(256, (16_384 - 76 - 4 * steps) // (steps + 1))
    assert sheet_cell(1024, 1024, 38, steps) == (cell, cell)
    assert sheet_cell(1024, 512, 38, steps) == (cell, round(cell / 2))
    cells = {(r, c): Image.new("RGB", (cell, cell)) for r in range(2) for c in range(steps)}
    labels = [f"step {k} (t=0.50)" for k in range(steps)]
    sheet = make_grid(cells, ["block 0", "block 1"], labels, (cell, cell), Image.new("RGB", (cell, cell)))
    assert max(sheet.size) <= 16_384  # JPEG's limit is 65,535; 1,000 steps of 256 px cells made 260,332
    save_jpeg(sheet, tmp_path / "sheet.jpg")


def test_the_cpu_lens_batch_fits_half_the_host_memory(monkeypatch):
    from flux.configs import FULL_AE_PARAMS

    cpu = torch.device("cpu")
    # The full VAE's widest activation at 1024 px: 256 channels at full resolution, 8 float32 copies.
    per_image = 8 * 4 * 256 * 1024 * 1024
    for available, batch in ((40e9, int(20e9 // per_image)), (1e9, 1), (None, 8), (1e12, 8)):
        monkeypatch.setattr(flux.decode, "available_host_memory", lambda a=available: a and int(a))
        assert flux.decode.auto_batch_size(FULL_AE_PARAMS, 1024, 1024, cpu) == batch
    assert int(20e9 // per_image) == 2  # the case above is a real limit, neither 1 nor 8
    monkeypatch.setattr(flux.decode, "available_host_memory", lambda: int(40e9))
    assert flux.decode.auto_batch_size(FULL_AE_PARAMS, 256, 256, cpu) == 8  # small images: the usual batch


def test_the_gpu_lens_batch_fits_70_percent_of_the_free_gpu_memory(monkeypatch):
    """On CUDA the batch is what fits in 70% of the free memory (the rest is the allocator's and cuDNN's
    headroom), one at least and 64 at most; no GPU is needed to check the arithmetic."""
    from flux.configs import FULL_AE_PARAMS

    cuda = torch.device("cuda")
    # The full VAE's widest activation: 256 channels at full resolution, 8 float32 copies: 8 GiB at 1024 px.
    per_image = 8 * 4 * 256 * 1024 * 1024
    assert per_image == 8 * 2**30
    for free_gib, batch in ((40, 3), (11, 1), (5, 1)):  # 28 GiB hold 3 images; 7.7 GiB none, but one is tried
        monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device, f=free_gib: f * 2**30)
        assert flux.decode.auto_batch_size(FULL_AE_PARAMS, 1024, 1024, cuda) == batch, free_gib
    monkeypatch.setattr(flux.decode, "free_gpu_bytes", lambda device: 80 * 2**30)
    assert flux.decode.auto_batch_size(FULL_AE_PARAMS, 256, 256, cuda) == 64  # 112 would fit: capped


def test_sizes():
    assert cell_size(64, 48) == (64, 48)
    assert cell_size(1024, 768) == (256, 192)
    assert cell_size(512, 1360) == (96, 256)  # 512 * 256 / 1360 = 96.4
    assert grid_size(3, 4, 10, 20, final=False) == (LABEL_W + 4 * 14, LABEL_H + 3 * 24)
    assert chunk_sizes(0, 8) == []
    for n, b in ((57, 8), (229, 64), (5, 8), (1, 1), (10, 3)):
        sizes = chunk_sizes(n, b)
        assert sum(sizes) == n and max(sizes) <= b and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-n // b)


def _write_checkpoint(path, layer, extra=True, drop=None):
    tensors = {f"final_layer.{k}": v.contiguous() for k, v in layer.state_dict().items()}
    if extra:
        tensors |= {
            "img_in.weight": torch.randn(64, 64),
            "double_blocks.0.img_attn.qkv.bias": torch.randn(192),
        }
    if drop is not None:
        del tensors[drop]
    save_file(tensors, str(path))


def test_load_final_layer_reads_only_its_tensors(model, tmp_path, monkeypatch):
    path = tmp_path / "flow.safetensors"
    _write_checkpoint(path, model.final_layer)
    read = []
    real_safe_open = flux.loading.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(flux.loading, "safe_open", Recording)
    layer = load_final_layer(path, TINY_PARAMS, "cpu", torch.float32)
    assert read and all(key.startswith("final_layer.") for key in read)
    for name, tensor in model.final_layer.state_dict().items():
        assert torch.equal(layer.state_dict()[name], tensor), name
    assert layer.linear.weight.dtype == torch.float32 and not layer.linear.weight.is_meta
    bf16 = load_final_layer(path, TINY_PARAMS, "cpu", torch.bfloat16)
    assert bf16.linear.weight.dtype == torch.bfloat16


def test_load_final_layer_errors_clearly(model, tmp_path):
    path = tmp_path / "flow.safetensors"
    _write_checkpoint(path, model.final_layer, drop="final_layer.linear.bias")
    with pytest.raises(
        UserError, match=r"does not match the final layer of this model: 1 missing \(linear\.bias\)"
    ):
        load_final_layer(path, TINY_PARAMS, "cpu", torch.float32)
    with pytest.raises(UserError, match="No flow checkpoint"):
        load_final_layer(tmp_path / "nope.safetensors", TINY_PARAMS, "cpu", torch.float32)
    _write_checkpoint(path, model.final_layer)
    wide = TINY_PARAMS.__class__(**{**TINY_PARAMS.__dict__, "hidden_size": 128})
    d, out = TINY_PARAMS.hidden_size, TINY_PARAMS.out_channels
    with pytest.raises(UserError, match=rf"linear\.weight \({out}, {d}\) != \({out}, 128\)"):
        load_final_layer(path, wide, "cpu", torch.float32)


def test_compile_defaults_to_where_it_pays_and_one_shape_per_image_size():
    from flux.configs import FULL_AE_PARAMS
    from flux.decode import compile_pays, stable_batch_size

    # flux-schnell's 229 lens images at 256 px decode eagerly in under a second: compiling (~30 s) never pays;
    # flux-dev's 2,851 at 1024 px take minutes eagerly.
    assert not compile_pays(229, 256, 256)
    assert not compile_pays(229, 1024, 1024)
    assert compile_pays(2851, 1024, 1024)
    for size, expected in ((256, 32), (512, 8), (1024, 2)):
        # 16 GiB over the decoder's estimated 2**29 * (size / 256)**2 bytes per image, whether 40 or 64
        # images fit in the free memory (capture time, with the flow model resident, vs decode later).
        assert stable_batch_size(FULL_AE_PARAMS, size, size, limit=40) == expected
        assert stable_batch_size(FULL_AE_PARAMS, size, size, limit=64) == expected
    assert stable_batch_size(FULL_AE_PARAMS, 1024, 1024, limit=1) == 1


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_a_compile_that_runs_out_of_memory_is_not_called_a_compiler_failure(
    model, ae, capture, tmp_path, monkeypatch, capsys, error
):
    def compile_out_of_memory(module, **kwargs):
        def compiled(*args, **kw):  # RuntimeError: as inductor wraps an error raised while autotuning
            raise error("CUDA out of memory. Tried to allocate 8.00 GiB")

        return compiled

    monkeypatch.setattr(torch, "compile", compile_out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"Tried to allocate 8\.00 GiB"):
        decode_capture(capture, model.final_layer, ae, tmp_path / "lens", compile=True, progress=False)
    assert "runs uncompiled" not in capsys.readouterr().err


def test_a_failing_compile_falls_back_to_the_eager_decoder(model, ae, capture, tmp_path, monkeypatch, capsys):
    def broken_compile(module, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no C compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = decode_capture(
        capture, model.final_layer, ae, tmp_path / "fallback", compile=True, progress=False
    )
    assert not fallback.compiled
    err = capsys.readouterr().err
    assert "runs uncompiled" in err and "no C compiler found" in err
    eager = decode_capture(capture, model.final_layer, ae, tmp_path / "eager", compile=False, progress=False)
    assert fallback.batch_size == eager.batch_size and not eager.compiled
    names = sorted(p.name for p in (tmp_path / "eager").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fallback").iterdir())
    for name in names:
        assert (tmp_path / "fallback" / name).read_bytes() == (tmp_path / "eager" / name).read_bytes(), name


def test_a_jpeg_cut_short_by_a_full_disk_is_an_error_and_leaves_nothing(tmp_path):
    """Pillow writes a JPEG to the file descriptor in 64 KiB chunks and takes a short write for success,
    so a disk that fills up mid-image would leave a truncated file in place. A file size limit makes the
    kernel do exactly that (in a child process: the limit is process-wide)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import io, os, resource, signal
        import numpy as np
        from PIL import Image
        from flux.decode import save_jpeg
        from flux.errors import UserError
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        size = io.BytesIO()
        img.save(size, format="JPEG", quality=95, subsampling=0)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: a short write, then EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size.tell() - 10, resource.RLIM_INFINITY))
        try:
            save_jpeg(img, {str(tmp_path / "a.jpg")!r})
            print("saved", os.path.getsize({str(tmp_path / "a.jpg")!r}), "of", size.tell())
        except UserError as e:
            print("UserError:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("UserError:") and "full" in done.stdout, done.stdout
    assert os.listdir(tmp_path) == []  # neither the image nor its temporary file


def test_the_sheet_columns_name_each_step_and_the_time_it_starts_at(model, ae, tmp_path, monkeypatch):
    capture = make_capture(model, keep_steps=[0, 2])
    seen = []
    real = flux.decode.make_grid
    monkeypatch.setattr(flux.decode, "make_grid", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    decode_capture(capture, model.final_layer, ae, tmp_path, progress=False)
    pairs = capture["denoising_context"]["timestep_pairs"]
    expected = [f"step {k} (t={float(pairs[k][0]):.2f})" for k in (0, 2)]
    assert seen == [expected, expected]  # the double and the single sheet
