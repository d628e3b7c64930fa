#!/usr/bin/env bash
# The offloading issue's GPU checks (tests/gpu) as one prepared command for a lent GPU machine
# (the `device` tool's H200; CI never has a GPU). Not for CPU machines: tests/gpu skips there.
#
# The device image has torch, transformers, pytest, psutil, safetensors, tokenizers and tqdm, but
# not pulp or gguf; carry their wheels. Here, once per checkout:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       -d .whl pulp==3.3.2 gguf==0.19.0                                   # ~16 MB
# then, with the device tool (each part must end inside one call's 10 minutes):
#   run(command="bash scripts/gpu_check.sh 1", carry=[".whl"], timeout_s=600)  # parity, refill, OPT-1.3B
#   run(command="bash scripts/gpu_check.sh 2", carry=[".whl"], timeout_s=600)  # OPT-6.7B
# FLEXALISA_GPU_GEN_LEN=128 before `bash` shortens a first timing pass (the JSON lines carry
# gen_len). Output: $OUT/gpu_log_PART.txt (the pytest log) and $OUT/gpu_results_PART.jsonl (one
# JSON line per policy run: throughputs, transfer overlap, phase crossings, bytes, peaks).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-1}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
log="$out/gpu_log_$part.txt"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -n "${FLEXALISA_GPU_GEN_LEN:-}" && ! "$FLEXALISA_GPU_GEN_LEN" =~ ^[1-9][0-9]*$ ]]; then
    echo "$0: FLEXALISA_GPU_GEN_LEN must be a positive integer, got '$FLEXALISA_GPU_GEN_LEN'" >&2
    exit 2
fi
case "$part" in
    1) select="parity_tiny or refills or opt-1.3b" ;;
    2) select="opt-6.7b" ;;
    *) echo "usage: $0 1|2" >&2; exit 2 ;;
esac
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$log"
python3 -m pytest tests/gpu -s -p no:cacheprovider -k "$select" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
if [ "$part" = 1 ]; then  # the engine's refilling vs fixed batches on CUDA (a JSON line)
    python3 scripts/bench_refill.py --device cuda --preset opt-1.3b --prompts 512 --batch 128 \
        --repeat 3 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
grep '^{"model"' "$log" > "$out/gpu_results_$part.jsonl" || true
exit "$status"
