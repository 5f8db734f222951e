#!/usr/bin/env bash
# One time-boxed GPU session (about 9 minutes on one H100/H200): the checks and figures that need CUDA.
# Full-size flux-schnell with random weights built on the GPU (speed does not depend on weight values).
#
#   bash benchmarks/gpu_check.sh            # writes logs and JSON under $OUT (or /tmp/gpu_check)
#
# The device's own python3 (torch, transformers, safetensors, einops, pillow) runs our code from the
# checkout; `fire` is only needed for the CLI smoke test and is skipped when missing.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# 1. Correctness on CUDA: flux-tiny end to end, capture on/off give the same image, lens runs (~1 min).
if python3 -c "import fire" 2>/dev/null; then
    for capture in True False; do
        timeout 120 python3 capture_sample.py --model flux-tiny --device cuda --seed 1 --capture $capture \
            --compile_decoder False --output_dir "$OUT/tiny_$capture" --progress False 2>&1 | tail -4
    done
    cmp "$OUT/tiny_True/img_0.jpg" "$OUT/tiny_False/img_0.jpg" && echo "capture on/off: identical images"
fi

# 2. The lens: seconds per image, batched vs one at a time, eager vs compiled (~2 min).
timeout 180 python3 benchmarks/bench_decode.py --model flux-schnell --random_weights --sizes 256 1024 \
    2>&1 | tee "$OUT/decode.txt"

# 3. Capture cost and the whole capture + lens + save against the earlier tool's way (~5 min).
timeout 330 python3 benchmarks/bench_capture.py --model flux-schnell --random_weights --quick \
    --sizes 256 512 1024 --json "$OUT/capture.json" 2>&1 | tee "$OUT/capture.txt"
