#!/usr/bin/env bash
# Issue #17's GPU smoke check, for a machine with an NVIDIA GPU, in under 10 minutes: a fresh venv, torch's CUDA
# build from the package index, the project as the README installs it, the engine parity tests with our engine on
# the GPU (KVMESH_TEST_DEVICE=cuda; HF's reference stays on the CPU), a short bench/engine.py run on cuda, and a
# summary. Without a GPU it stops at once: no nvidia-smi (or no GPU it lists) exits 2.
#   bench/gpu_smoke.sh [OUTDIR]        # OUTDIR (default: a new temporary folder) gets the logs and engine-cuda.*
# Environment: PYTHON (python3), KVMESH_GPU_VENV (.venv-gpu), TORCH_SPEC (torch==2.13.0), TORCH_INDEX_URL (empty:
# the default index, whose Linux torch wheels are CUDA builds; or e.g. PyTorch's cu128 index), KVMESH_GPU_DEVICE
# (cuda). Paste engine-cuda.md into bench/RESULTS.md.
set -uo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_smoke: nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver" >&2
    exit 2
fi
if ! gpus=$(nvidia-smi -L 2>&1) || [ -z "$gpus" ]; then
    echo "gpu_smoke: nvidia-smi lists no GPU: ${gpus:-nothing}" >&2
    exit 2
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d -t kvmesh-gpu-smoke.XXXXXX)}
venv=${KVMESH_GPU_VENV:-$repo/.venv-gpu}
device=${KVMESH_GPU_DEVICE:-cuda}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
mkdir -p "$out" && cd "$repo" || exit 2
start=$SECONDS
failed=0
summary=()

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in $out/NAME.log; record the outcome.
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    tail -n 3 "$out/$name.log"
    summary+=("$(printf '%-8s %-5s %4ss  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo "rc=$rc")" \
        $((SECONDS - t0)) "$out/$name.log")")
    [ $rc -eq 0 ] || failed=1
    return $rc
}

index_args=()
[ -n "${TORCH_INDEX_URL:-}" ] && index_args=(--index-url "$TORCH_INDEX_URL")
step venv 60 "${PYTHON:-python3}" -m venv "$venv" || exit 1
py=$venv/bin/python
step torch 300 "$py" -m pip install -q "${index_args[@]}" "$torch_spec" || exit 1
step cuda 60 "$py" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO CUDA DEVICE'); sys.exit(0 if ok else 3)" \
    || { echo "gpu_smoke: the torch installed is not a CUDA build that sees this GPU (see $out/cuda.log)" >&2; exit 3; }
step project 240 "$py" -m pip install -q -e '.[test]' || exit 1
KVMESH_TEST_DEVICE=$device step parity 240 "$py" -m pytest -q -p no:cacheprovider tests/unit/engine/test_engine_parity.py
step bench 180 "$py" bench/engine.py --device "$device" --family llama --preset small --dtype bfloat16 \
    --batches 1,32 --prefills 128,512 --out "$out/engine-cuda.json" --results "$out/engine-cuda.md" \
    --label "GPU smoke (bench/gpu_smoke.sh)"

echo
echo "== gpu_smoke summary ($((SECONDS - start)) s; budget 600 s)"
echo "$gpus"
head -n 1 "$out/cuda.log"
printf '%s\n' "${summary[@]}"
grep -E "passed|failed|error" "$out/parity.log" | tail -n 1
[ -f "$out/engine-cuda.md" ] && grep '^|' "$out/engine-cuda.md"
[ $((SECONDS - start)) -le 600 ] || echo "gpu_smoke: took longer than the 10 minutes it is meant to" >&2
exit $failed
