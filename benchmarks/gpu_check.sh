#!/usr/bin/env bash
# duet's GPU check (issues 15, 36), unattended, for one lent H100/H200 with no network (../shared/GPU.md):
#   the training stack arrives as wheels in .whl/ next to the checkout (~62 MB, plus liger-kernel for
#   the Liger arm; SmolLM2 cannot travel: every model here is random-initialised from a config);
#   1. the planner against torch.cuda.max_memory_reserved() for every GPU config of
#      benchmarks/vram_planner.py (LoRA/QLoRA SFT and DPO, 0.5B-1.5B and 7-8B shapes in 4-bit), through
#      duet's own training path, one child process a config, results written after each;
#   2. benchmarks/gpu_check.py: LoRA and QLoRA SFT and DPO on the 1.5B shape, packing on and off, a full
#      fine-tune, each merged and verified in bf16, the dtypes that trained, every phase's peak against
#      its estimate, a real OOM (the allocator's per-process fraction) and its recovery, the exporter's
#      scrape (NVML series, duet's own memory), tokens/s and MFU beside plain TRL and TRL with Liger.
# Budget: under 8 minutes on an H100 (each part has its own limit; a part cut short keeps what it
# measured). Results land in $OUT (or ./gpu-check-out); commit them under benchmarks/results/ named by
# the device. From the repository root (the device tool: carry .whl):
#   bash benchmarks/gpu_check.sh
# `make test` runs both parts on this CPU with tiny shapes (tests/integration/test_gpu_check_smoke.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
start=$(date +%s)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "pip install of .whl/ failed (see pip.log)"
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1
} > "$OUT/device.txt"
cat "$OUT/device.txt"

# 1. the planner vs the measured peak (one process a config); at most 3 minutes
timeout 180 $PY -m benchmarks.vram_planner --device cuda --out "$OUT" > "$OUT/vram_planner.log" 2>&1
echo "vram_planner: exit $? after $(( $(date +%s) - start )) s"

# 2. the engine end to end; at most 4.5 minutes
timeout 270 $PY -m benchmarks.gpu_check --out "$OUT" --steps 20 > "$OUT/gpu_check.log" 2>&1
echo "gpu_check: exit $? after $(( $(date +%s) - start )) s"
tail -5 "$OUT/gpu_check.log"
ls -la "$OUT"
