"""Checks that only a CUDA machine can run: capture copies on the side stream into pinned memory (bf16, and
converted to fp32, and into buffers pinned by another thread as the CLI pins them while the models load) or
into buffers on the GPU (a .pt that fits there, written from host copies),
the lens on the GPU (exactness, batched vs one at a time, compiled vs eager), and --offload's moves.
Run on a GPU machine (no weights needed: flux-tiny's are generated, or read from FLUX_TINY_DIR, in bf16):

    python3 scripts/cuda_checks.py          # `python3 scripts/cuda_checks.py cpu`: the same on the CPU

Prints one line per check and exits non-zero if any fails.
"""

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux.capture import CapturePlan
from flux.configs import CONFIGS
from flux.decode import LensKey, decode_capture, lens_latent
from flux.loading import load_ae, load_flow_model
from flux.pipeline import CaptureSession, buffers_in_a_thread, sample
from flux.sampling import get_noise, get_schedule, prepare
from flux.store import load_capture

SIZE, STEPS = 512, 6


def pixel_difference(a: Path, b: Path) -> tuple[int, float, float]:
    """Between the same-named JPEGs of two lens folders: the largest difference of one pixel in levels,
    the mean over all images, and the worst image's mean (one wrong image stands out in it)."""
    names = sorted(p.name for p in a.glob("*_block_*.jpg"))
    assert names and names == sorted(p.name for p in b.glob("*_block_*.jpg")), "different files"
    diffs = [
        np.abs(np.asarray(Image.open(a / n), np.int16) - np.asarray(Image.open(b / n), np.int16))
        for n in names
    ]
    means = [float(d.mean()) for d in diffs]
    return max(int(d.max()) for d in diffs), float(np.mean(means)), max(means)


def tensor_devices(obj) -> set[str]:
    """The device types of the tensors in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return {obj.device.type}
    if isinstance(obj, (dict, list, tuple)):
        return set().union(*map(tensor_devices, obj.values() if isinstance(obj, dict) else obj))
    return set()


def describe(diff: tuple[int, float, float]) -> str:
    return f"mean {diff[1]:.3f} levels, worst image {diff[2]:.3f}, worst pixel {diff[0]}"


def main() -> int:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dtype, spec = torch.bfloat16, CONFIGS["flux-tiny"]
    flow = load_flow_model(spec, device, dtype)
    ae = load_ae(spec, device)
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(1, spec.t5_max_length, spec.params.context_in_dim, generator=g).to(device, dtype)
    y = torch.randn(1, spec.params.vec_in_dim, generator=g).to(device, dtype)
    inp = prepare(get_noise(1, SIZE, SIZE, device, dtype, seed=1), txt, y)
    timesteps = get_schedule(STEPS, inp["img"].shape[1])
    plain = sample(flow, inp, timesteps, 3.5)

    seen: dict = {}  # every single block's output, copied synchronously by a plain hook
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, []).append(o.detach().cpu()))
        for i, b in enumerate(flow.single_blocks)
    ]
    failures = 0

    def report(label: str, name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} [{label}, {where}] {name}{f' ({detail})' if detail else ''}")

    with tempfile.TemporaryDirectory() as tmp:
        # buffers: "auto" where CaptureSession.open puts them (for a .pt on a large GPU: on it), "host"
        # pinned host memory, "thread" host memory pinned by another thread, as the CLI pins while loading
        runs = [("pt", "both", None, "auto"), ("safetensors", "both", None, "auto")]
        runs += [("pt", "img", torch.float32, "auto"), ("pt", "both", None, "thread")]
        runs += [("pt", "both", None, "host")]
        for fmt, streams, capture_dtype, buffers in runs:
            label = f"{fmt}, {streams}, {capture_dtype or dtype}, buffers {buffers}"
            seen.clear()
            plan = CapturePlan.everything(flow, STEPS, capture_dtype)
            plan = CapturePlan(plan.double, plan.single, plan.steps, streams, capture_dtype)
            meta = {
                "captured_steps": list(plan.steps),
                "captured_blocks": {"double": list(plan.double), "single": list(plan.single)},
                "height": SIZE,
                "width": SIZE,
                "streams": streams,
            }
            path = Path(tmp) / f"capture_{len(list(Path(tmp).iterdir()))}{'.pt' if fmt == 'pt' else ''}"
            pool = None
            if buffers == "thread":  # as capture_sample.py does while the models load (buffers_while_loading)
                dims = (plan, fmt, txt.shape[1], inp["img"].shape[1], dtype, STEPS, device)
                pool = buffers_in_a_thread(flow.params, *dims).result()
                pinned = [t.is_pinned() for t in pool.acquire().values()]
                report(label, "the buffers are pinned on CUDA", set(pinned) == {device.type == "cuda"})
                pool = buffers_in_a_thread(flow.params, *dims).result()  # fresh: the check above took a set
            session = CaptureSession.open(
                flow, plan, fmt, path, txt.shape[1], inp["img"].shape[1], dtype, meta, STEPS, device, pool,
                on_device=False if buffers == "host" else None,
            )  # fmt: skip
            if fmt == "pt" and device.type == "cuda":
                # flux-tiny's few MB fit on any GPU: the .pt capture waits there unless told otherwise
                on_gpu = session.capture.pool.device is not None
                report(
                    label, "the buffers are on the GPU exactly when expected", on_gpu == (buffers == "auto")
                )
            latent = sample(flow, inp, timesteps, 3.5, session)
            ctx = {
                "txt_seq_len": txt.shape[1],
                "final_latent": latent.cpu(),
                "timestep_pairs": list(itertools.pairwise(timesteps)),
            }
            session.sink.finish(ctx, meta)
            if fmt == "pt":  # a capture made on a GPU must open on a machine without one
                devices = tensor_devices(torch.load(path, weights_only=True))  # no map_location
                report(label, "the .pt holds host tensors only", devices == {"cpu"}, str(sorted(devices)))
            capture = load_capture(path)
            n_txt = 0 if streams == "img" else txt.shape[1]
            expected = {
                i: [o[:, txt.shape[1] - n_txt :].to(capture_dtype or dtype) for o in outs]
                for i, outs in seen.items()
            }
            report(label, "capture does not change the result", torch.equal(latent, plain))
            report(
                label,
                "the captured copies equal the block outputs",
                all(
                    torch.equal(capture["single_blocks"][f"block_{i}"][k], expected[i][k])
                    for i in expected
                    for k in range(STEPS)
                ),
            )
            last = LensKey("single", len(seen) - 1, STEPS - 1, STEPS - 1)
            report(
                label,
                "lens x0 of the last block at the last step is the final latent",
                torch.equal(lens_latent(capture, last, flow.final_layer).cpu(), latent.cpu()),
            )
            if fmt != "safetensors":
                continue
            # The lens on this device: the final latent stays on the host, block latents do not.
            lens = {}
            for mode, batch, compile in (
                ("one", 1, False),
                ("batched", None, False),
                ("compiled", None, True),
            ):
                lens[mode] = Path(tmp) / f"lens_{mode}"
                result = decode_capture(
                    capture, flow.final_layer, ae, lens[mode], device=device, batch_size=batch,
                    compile=compile, progress=False,
                )  # fmt: skip
                if compile:
                    report(
                        label, "the compiled decoder ran", result.compiled, f"{result.compile_seconds:.1f} s"
                    )
            # What bf16 rounding alone does here: the same lens, one at a time, with the VAE in float32
            # on the CPU (the final layer is the same bf16 computation in every lens above).
            lens["fp32"] = Path(tmp) / "lens_fp32"
            decode_capture(
                capture, flow.final_layer, ae, lens["fp32"], device="cpu", batch_size=1, compile=False,
                progress=False,
            )  # fmt: skip
            ae.decoder.to(device)
            ref = pixel_difference(lens["fp32"], lens["one"])
            report(
                label,
                "the bf16 lens one at a time is close to the float32 lens",
                ref[1] < 5 and ref[2] < 16,  # a wrong image differs by tens of levels
                describe(ref),
            )
            for mode in ("batched", "compiled"):
                # Two bf16 computations differ from each other about as much as each differs from the
                # float32 one (by sqrt(2) if their roundings were independent): allow twice that, plus a
                # little for the float32 reorderings of a compiled graph, and never more than the fixed
                # caps (so a lens gone wrong one at a time cannot loosen the check). Single pixels are
                # only reported: one flipped JPEG coefficient moves a few by ten levels.
                diff = pixel_difference(lens["one"], lens[mode])
                report(
                    label,
                    f"lens {mode} vs one at a time within bf16 rounding",
                    diff[1] <= min(2 * ref[1] + 0.05, 5) and diff[2] <= min(2 * ref[2] + 0.5, 16),
                    f"{describe(diff)}; bf16 vs float32: {describe(ref)}",
                )
    for h in hooks:
        h.remove()
    offload_checks(spec, device, report)
    attention_checks(device, report)
    if device.type == "cuda":
        write_beside_the_lens_check(device, report)
    return 1 if failures else 0


def write_beside_the_lens_check(device: torch.device, report) -> None:
    """A `.pt` capture on the GPU is copied to host memory for its write (`on_host`, in the write's thread)
    while the lens decodes on the default stream: the copies must not wait for the decoder batches queued
    there. Here about a second of GPU work is queued on the default stream first."""
    from concurrent.futures import ThreadPoolExecutor

    from flux.store import on_host

    capture = {"blocks": [(torch.randn(256, 3072, device=device), torch.randn(512, 3072, device=device))]}
    torch.cuda.synchronize(device)
    torch.cuda._sleep(2_000_000_000)  # about a second: the lens's queued batches
    with ThreadPoolExecutor(1) as thread:  # a thread that never chose a GPU, as the write's
        start = time.perf_counter()
        copied = thread.submit(on_host, capture).result()
        seconds = time.perf_counter() - start
    busy = not torch.cuda.current_stream(device).query()  # the queued work is still running
    torch.cuda.synchronize(device)
    same = all(torch.equal(a.cpu(), b) for a, b in zip(capture["blocks"][0], copied["blocks"][0]))
    on_cpu = all(t.device.type == "cpu" for t in copied["blocks"][0])
    report(
        "write beside the lens",
        "host copies of a capture on the GPU do not wait for the lens's stream",
        busy and same and on_cpu,
        f"{1e3 * seconds:.0f} ms, the default stream {'still busy' if busy else 'idle'} after",
    )


def attention_checks(device: torch.device, report) -> None:
    """flux.attention's scores at full FLUX.1 size (24 heads of 128, 512 text + 4096 image tokens: 1024 px)
    in bf16 on the GPU, in chunks of image queries, against the same softmax in float64 on the CPU."""
    from flux.attention import text_attention
    from flux.layers import EmbedND
    from flux.math import apply_rope
    from flux.sampling import img_ids_for

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 24, 512 + 4096, 128, generator=g).to(device, torch.bfloat16) for _ in range(2))
    ids = torch.cat((torch.zeros(1, 512, 3), img_ids_for(1, 128, 128)), dim=1).to(device)
    pe = EmbedND(128, 10_000, [16, 56, 56])(ids)
    positions = [0, 5, 511]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    got = text_attention(q, k, pe, 512, positions).cpu()
    rq, rk = (t.cpu().double() for t in apply_rope(q, k, pe))  # the bf16 q and k the block's SDPA sees
    want = torch.softmax(rq[:, :, 512:] @ rk.transpose(-1, -2) / 128**0.5, dim=-1)[..., positions]
    err = float((got.double() - want.mean(dim=1).transpose(1, 2)).abs().max())
    report(
        "attention",
        "bf16 attention maps at full size equal float64 softmax",
        err < 1e-6,
        f"max error {err:.2e}",
    )
    if (
        cuda
    ):  # the README's figure: about 0.4 GB (a 256 MB chunk of scores, the rotated q and k, k in float32)
        extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        report(
            "attention", "the maps' extra device memory at 1024 px", extra < 512, f"peak extra {extra:.0f} MB"
        )

    # The whole command path on a flux-tiny capture made on this GPU: the replay is the run, bit for bit, and
    # each step's maps reach the host.
    from flux.attention import attention_maps
    from flux.pipeline import RunOptions, generate, load_models
    from flux.store import load_capture

    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(
            model="flux-tiny", prompt="a red fox", seed=2, width=128, height=96, device=str(device),
            output_dir=tmp, should_decode_intermediates=False,
        ).validate()  # fmt: skip
        models = load_models(opts.spec, device, progress=False)
        capture = load_capture(generate(models, opts, progress=False).capture_path)
        maps = attention_maps(models.flow, capture)
        final = capture["denoising_context"]["final_latent"]
        report(
            "attention", "the replay behind the maps is the run", torch.equal(maps.replay.latent.cpu(), final)
        )
        shares = maps.maps
        ok = shares.device.type == "cpu" and bool(shares.isfinite().all()) and float(shares.min()) >= 0
        report("attention", "maps on the host, shares in [0, 1)", ok and float(shares.sum(dim=3).max()) < 1)


def offload_checks(spec, device: torch.device, report) -> None:
    """--offload: each model visits the GPU and comes back to the very tensors it was loaded into (no copy
    back, no second copy in RAM), and the image is the one a run without it makes."""
    from dataclasses import replace

    from flux.pipeline import RunOptions, generate, load_models

    images = {}
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(
            model="flux-tiny", prompt="a red cube", seed=1, width=64, height=64, device=str(device),
            output_dir=tmp, should_decode_intermediates=False,
        )  # fmt: skip
        for offload in (False, True):
            models = load_models(spec, device, offload=offload, progress=False)
            loaded = {n: p.data_ptr() for n, p in models.flow.named_parameters()}
            result = generate(models, replace(opts, offload=offload).validate(), progress=False)
            images[offload], capture = result.image, result.capture_path
            if offload:
                back = {n: p.data_ptr() for n, p in models.flow.named_parameters()} == loaded
                on_cpu = all(p.device.type == "cpu" for p in models.flow.parameters())
                report("offload", "the flow model is back on the tensors it was loaded into", back and on_cpu)
        report("offload", "--offload gives the same image", torch.equal(images[False], images[True]))
        # sweep --offload: the flow model visits the GPU for each replay and leaves before each decode.
        from flux.sweep import sweep_command

        rows = []
        for offload in (False, True):
            out = Path(tmp) / f"sweep_{offload}"
            sweep_command(str(capture), "skip", blocks="double:0,single:1", output_dir=str(out),
                          device=str(device), offload=offload, progress=False)  # fmt: skip
            rows.append(json.loads((out / "sweep.json").read_text())["rows"])
        report("offload", "sweep --offload gives the same scores", rows[0] == rows[1])


if __name__ == "__main__":
    sys.exit(main())
