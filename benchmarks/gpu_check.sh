#!/usr/bin/env bash
# The checks and figures that need CUDA, in two stages of under 10 minutes each (one H100/H200; a device
# call may run 10 minutes, a session has 15 in all). Full-size flux-schnell with random weights built on the
# GPU (speed does not depend on weight values); the device's own python3 and torch run our checkout.
#
#   bash benchmarks/gpu_check.sh 1    # CUDA correctness checks (bf16, pinned copies, a .pt on the GPU,
#                                     # provoked races) + the lens benchmark + the attention maps' cost
#   bash benchmarks/gpu_check.sh 2    # the capture benchmark (the targets; pt on the GPU and
#                                     # pt_host in pinned memory): 512 and 256 px (5 rounds), then
#                                     # 1024 px (3); then pinning and the .pt write
#   bash benchmarks/gpu_check.sh checks   # stage 1 without the lens and attention benchmarks
#
# Run stage 2 straight after stage 1: an idle machine is handed back after 30 s, and a fresh one costs
# its start and inductor's warm cache. On an H200 (2026-11-27) stage 1 took 3 minutes, `checks` plus the
# capture benchmark in one call 6; stage 2 now also times pinning and the .pt write (about 1 minute more).
# Each stage stops starting steps when its budget (BUDGET_S, default 570 s: a device call may run 600) is
# spent, and cuts the running one short at the deadline with SIGINT, so Python cleans up and the capture
# benchmark's JSON keeps every run measured so far (its "runs"). What is skipped is said in gpu.txt. With
# the machine's start, both stages fit one session's 15 minutes when they run as on the H200 so far.
#
# flux-tiny (used by the correctness checks) is generated on first use with the machine's transformers;
# to skip that, copy ~/.cache/flux-intermediate-representation/flux-tiny-v2 to output/flux-tiny-v2 (git
# ignores output/) and carry it along.
#
# Logs and JSON go to $OUT (or /tmp/gpu_check). The checkout travels without .git: pass the commit measured,
# e.g. `COMMIT=$(git rev-parse --short HEAD)` worked out here and written into the command, to name it in
# gpu.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
if [ -d output/flux-tiny-v2 ]; then export FLUX_TINY_DIR="$PWD/output/flux-tiny-v2"; fi
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'not given (COMMIT=...)')}" \
    | tee -a "$OUT/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"

rc=0
BUDGET_S="${BUDGET_S:-570}"

# run_for SECONDS COMMAND...: COMMAND under a timeout that also ends by the stage's deadline (SIGINT, then
# SIGKILL 10 s later); skipped, and failed, when under 20 s of the budget are left.
run_for() {
    local limit=$1 left=$((BUDGET_S - SECONDS))
    shift
    if [ "$left" -lt 20 ]; then
        echo "SKIPPED (stage budget of ${BUDGET_S} s spent): $*" | tee -a "$OUT/gpu.txt" >&2
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -s INT -k 10 "$limit" "$@"
}

checks() {
    # Preflight (seconds): the packages our code imports, and whether torch.compile works here at all
    # (inductor needs a C compiler and Triton; without them the lens decodes uncompiled and says so).
    run_for 60 python3 -c "import einops, numpy, PIL, safetensors, tqdm, torch; print('torch', torch.__version__)
f = torch.compile(lambda x: x.sin() + 1)
print('torch.compile works:', bool(f(torch.ones(8, device='cuda')).sum() > 0))" 2>&1 | tee -a "$OUT/gpu.txt" \
        || rc=1
    run_for 150 python3 scripts/cuda_checks.py 2>&1 | tee "$OUT/cuda_checks.txt" || rc=1
    # Races provoked (delayed streams, recycled pinned sets), then the same with the capture broken on
    # purpose: a negative control that passes means the provocations prove nothing.
    run_for 60 python3 scripts/cuda_stress.py 2>&1 | tee "$OUT/cuda_stress.txt" || rc=1
    for broken in wait record; do
        run_for 60 python3 scripts/cuda_stress.py --break "$broken" >"$OUT/control_$broken.txt" 2>&1
        if grep -q "^FAIL .*every captured tensor" "$OUT/control_$broken.txt"; then
            echo "negative control --break $broken: caught, as it must be" | tee -a "$OUT/cuda_stress.txt"
        else
            echo "NEGATIVE CONTROL --break $broken NOT CAUGHT (see control_$broken.txt)" | tee -a "$OUT/cuda_stress.txt"
            rc=1
        fi
    done
}

decode_bench() {
    run_for 200 python3 benchmarks/bench_decode.py --model flux-schnell --random_weights --sizes 256 1024 \
        2>&1 | tee "$OUT/decode.txt" || rc=1
}

attention_bench() {
    # What attention maps add to a replayed step, and their scores' device memory (a minute or two).
    run_for 150 python3 benchmarks/bench_attention.py --model flux-schnell --random_weights --sizes 256 1024 \
        2>&1 | tee "$OUT/attention.txt" || rc=1
}

pinning_bench() {
    # Seconds to pin a whole capture's host buffers with cudaHostAlloc (torch's default) and with
    # cudaHostRegister after 8 or 16 threads map the pages, and whether pinning beside a launch-bound loop
    # slows it: the .pt path's setup, a third of its run at 256 px (a minute or two; the JSON is rewritten
    # after each mode, so a timeout loses only the modes not yet run).
    # 256 and 1024 px only: each mode pins about 9 GB three times (512 px lies between them).
    run_for 120 python3 benchmarks/bench_pinning.py --sizes 256 1024 --json "$OUT/pinning.json" 2>&1 \
        | tee "$OUT/pinning.txt" || rc=1
    # The .pt write: torch.save's inline CRC32s against ours, filled in on this machine's cores (seconds).
    run_for 40 python3 benchmarks/bench_save.py --output_dir "$PWD/output" 2>&1 | tee -a "$OUT/pinning.txt" || rc=1
}

capture_bench() {
    # 256 and 512 px are bound by the CPU launching kernels and vary more from run to run: five rounds
    # of the quick modes (naive once: it is the slowest and steadiest). 1024 px is GPU-bound: three rounds
    # after one warm-up (naive once).
    local common=(--model flux-schnell --random_weights --output_dir "$PWD/output/bench" --naive_repeats 1)
    run_for 220 python3 benchmarks/bench_capture.py "${common[@]}" --sizes 512 256 --repeats 5 \
        --json "$OUT/capture_small.json" 2>&1 | tee "$OUT/capture.txt" || rc=1
    run_for 240 python3 benchmarks/bench_capture.py "${common[@]}" --sizes 1024 --warmup 1 --repeats 3 \
        --json "$OUT/capture_1024.json" 2>&1 | tee -a "$OUT/capture.txt" || rc=1
}

case "${1:-1}" in
1) checks; decode_bench; attention_bench ;;
2) capture_bench; pinning_bench ;;
checks) checks ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh 1|2|checks" >&2
    exit 2
    ;;
esac
exit $rc
