"""Checks that only a CUDA machine can run: pinned non-blocking capture copies in bf16, and the lens's
exactness on the GPU. Run on a GPU machine (no weights needed: flux-tiny's are generated, cast to bf16):

    python3 scripts/cuda_checks.py          # `python3 scripts/cuda_checks.py cpu`: the same in bf16 on CPU

Prints one line per check and exits non-zero if any fails.
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from flux.capture import CapturePlan
from flux.configs import CONFIGS
from flux.decode import LensKey, lens_latent
from flux.loading import load_flow_model
from flux.pipeline import CaptureSession, sample
from flux.sampling import get_noise, get_schedule, prepare
from flux.store import load_capture


def main() -> int:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    dtype, spec = torch.bfloat16, CONFIGS["flux-tiny"]
    flow = load_flow_model(spec, device, dtype)
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(1, spec.t5_max_length, spec.params.context_in_dim, generator=g).to(device, dtype)
    y = torch.randn(1, spec.params.vec_in_dim, generator=g).to(device, dtype)
    inp = prepare(get_noise(1, 512, 512, device, dtype, seed=1), txt, y)
    steps = 6
    timesteps = get_schedule(steps, inp["img"].shape[1])
    plain = sample(flow, inp, timesteps, 3.5)

    seen: dict = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, []).append(o.detach().cpu()))
        for i, b in enumerate(flow.single_blocks)
    ]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("pt", "safetensors"):
            seen.clear()
            plan = CapturePlan.everything(flow, steps)
            meta = {
                "captured_steps": list(plan.steps),
                "captured_blocks": {"double": list(plan.double), "single": list(plan.single)},
                "height": 512,
                "width": 512,
            }
            path = Path(tmp) / ("c.pt" if fmt == "pt" else "c")
            session = CaptureSession.open(
                flow, plan, fmt, path, txt.shape[1], inp["img"].shape[1], dtype, meta, steps, device
            )
            latent = sample(flow, inp, timesteps, 3.5, session)
            ctx = {
                "txt_seq_len": txt.shape[1],
                "final_latent": latent.cpu(),
                "timestep_pairs": list(itertools.pairwise(timesteps)),
            }
            session.sink.finish(ctx, meta)
            capture = load_capture(path)
            checks = {
                "capture does not change the result": torch.equal(latent, plain),
                "pinned copies equal the block outputs": all(
                    torch.equal(capture["single_blocks"][f"block_{i}"][k], seen[i][k])
                    for i in seen
                    for k in range(steps)
                ),
                "lens x0 of the last block at the last step is the final latent": torch.equal(
                    lens_latent(
                        capture, LensKey("single", len(seen) - 1, steps - 1, steps - 1), flow.final_layer
                    ).cpu(),
                    latent.cpu(),
                ),
            }
            for name, ok in checks.items():
                failures += not ok
                where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
                print(f"{'PASS' if ok else 'FAIL'} [{fmt}, bf16, {where}] {name}")
    for h in hooks:
        h.remove()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
