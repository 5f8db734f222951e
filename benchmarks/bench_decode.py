"""Seconds per decoded image of the lens (final layer + unpack + VAE + JPEG), batched vs one at a time.

    uv run python benchmarks/bench_decode.py                         # flux-tiny, CPU-friendly sizes
    uv run python benchmarks/bench_decode.py --model flux-schnell --random_weights --sizes 256 512 1024

Builds a synthetic capture of `--n` block outputs at one step (random tensors: speed does not depend on
their values) and a final layer and AE with random weights, then times `decode_capture` per mode: the whole
lens per image (final layer, VAE, pixels back to the host, JPEG writes overlapped). On CUDA it also times
the compiled decoder, with the one-time compile and warm-up reported apart, and the VAE decoder alone
(eager and compiled, at the lens's batch size), the figure PERF_ANCHORS.md quotes.
"""

import argparse
import tempfile
import time

import torch

from flux.autoencoder import AutoEncoder
from flux.configs import get_spec
from flux.decode import decode_capture, decode_latents, decoder_bytes_per_image
from flux.layers import LastLayer
from flux.model import FluxParams
from flux.sampling import latent_size


def synthetic_capture(
    params: FluxParams, height: int, width: int, n: int, n_txt: int, dtype, pin: bool = False
) -> dict:
    """n block outputs at step 0 (a third double, the rest single with text tokens), plus a final latent;
    `pin`: in pinned memory, as a capture's host buffers are on CUDA (the lens copies from them)."""
    h, w = latent_size(height, width)
    n_img, d = (h // 2) * (w // 2), params.hidden_size
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        values = torch.randn(*shape, generator=gen).to(dtype)
        return values.pin_memory() if pin else values

    n_double = n // 3
    doubles = {f"block_{i}": [(rand(1, n_img, d), None)] for i in range(n_double)}
    singles = {f"block_{i}": [rand(1, n_txt + n_img, d)] for i in range(n - n_double)}
    ctx = {
        "img_state": [rand(1, n_img, 64)],
        "timestep_pairs": [(1.0, 0.75)],
        "vec": [rand(1, d)],
        "txt_seq_len": n_txt,
        "final_latent": rand(1, n_img, 64),
    }
    meta = {"height": height, "width": width, "captured_steps": [0], "streams": "img"}
    return {"double_blocks": doubles, "single_blocks": singles, "denoising_context": ctx, "metadata": meta}


def decoder_seconds_per_image(ae: AutoEncoder, decoder, size: int, batch: int, repeats: int = 5) -> float:
    """The VAE decoder alone (unpack, decode under the lens's autocast), per image, after one warm-up call."""
    device = ae.decoder.conv_in.weight.device
    h, w = latent_size(size, size)
    x = torch.randn(batch, h * w // 4, 64, device=device)
    with torch.inference_mode():
        decode_latents(x, ae, size, size, decoder)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            decode_latents(x, ae, size, size, decoder)
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / (repeats * batch)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="flux-tiny", help="flux-tiny, or a full-size model with --random_weights"
    )
    parser.add_argument("--random_weights", action="store_true", help="required for full-size models")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="square image sizes in pixels")
    parser.add_argument("--n", type=int, default=57, help="block outputs to decode per run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_compile", action="store_true", help="skip the compiled mode on CUDA")
    args = parser.parse_args()

    spec = get_spec(args.model)
    if spec.name != "flux-tiny" and not args.random_weights:
        parser.error("full-size models need --random_weights (this benchmark never downloads weights)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = args.sizes or ([256, 512, 1024] if cuda else [64])  # CPU: well under a minute
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        # No gradients, as loaded models have none (loading.load_checkpoint).
        final_layer = LastLayer(spec.params.hidden_size, 1, spec.params.out_channels).to(dtype).eval()
        ae = AutoEncoder(spec.ae_params).eval()  # float32 weights, bf16 autocast on CUDA, as the reference
        final_layer.requires_grad_(False)
        ae.requires_grad_(False)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    modes = [("one at a time", 1, False), ("batched", None, False)]
    if cuda and not args.no_compile:
        modes += [("batched, compiled", None, True)]
    print(f"decode benchmark: {spec.name}, random weights, {dtype}, on {name}, torch {torch.__version__}")
    print(f"{args.n} block outputs + 1 final latent per run; s/img includes the JPEG writes (overlapped)\n")
    header = f"{'size':>6} {'mode':<18} {'batch':>5} {'s/img':>9} {'total s':>8} {'compile s':>9}"
    if cuda:  # calibrates decoder_bytes_per_image (and so the lens's batch) against what the GPU used
        header += f" {'peak GB':>8} {'est. GB/img':>11}"
    print(header)
    print("-" * len(header))
    for size in sizes:
        capture = synthetic_capture(spec.params, size, size, args.n, spec.t5_max_length, dtype, pin=cuda)
        h, w = latent_size(size, size)
        with torch.inference_mode():  # untimed first call: allocator, kernel selection
            decode_latents(torch.zeros(1, h * w // 4, 64), ae, size, size)
        batches, compiled_ok = {}, False
        for label, batch_size, compile in modes:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with tempfile.TemporaryDirectory() as out_dir:
                start = time.perf_counter()
                report = decode_capture(
                    capture,
                    final_layer,
                    ae,
                    out_dir,
                    device=device,
                    batch_size=batch_size,
                    compile=compile,
                    progress=False,
                )
                total = time.perf_counter() - start
            if compile and not report.compiled:
                label = "batched (compile failed, eager)"
            row = (
                f"{size:>6} {label:<18} {report.batch_size:>5} {report.seconds_per_image:>9.4f} "
                f"{total:>8.2f} {report.compile_seconds:>9.2f}"
            )
            if cuda:  # the decode's own peak above what was allocated before, and the lens's estimate
                peak = (torch.cuda.max_memory_allocated(device) - base) / 1e9
                estimate = decoder_bytes_per_image(ae.params, size, size) / 1e9
                row += f" {peak:>8.2f} {estimate:>11.2f}"
            print(row)
            batches[compile] = report.batch_size
            compiled_ok = compiled_ok or report.compiled
        if cuda:  # the decoder alone, at the lens's batch size: comparable with PERF_ANCHORS.md
            eager = decoder_seconds_per_image(ae, ae.decoder, size, batches[False])
            print(f"{size:>6} {'VAE only, eager':<18} {batches[False]:>5} {eager:>9.4f}")
            if compiled_ok:
                compiled = torch.compile(ae.decoder, dynamic=False)  # reuses the graph compiled above
                per_image = decoder_seconds_per_image(ae, compiled, size, batches[True])
                print(f"{size:>6} {'VAE only, compiled':<18} {batches[True]:>5} {per_image:>9.4f}")


if __name__ == "__main__":
    main()
