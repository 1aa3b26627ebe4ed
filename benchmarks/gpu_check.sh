#!/usr/bin/env bash
# The GPU checks on one CUDA GPU, expected to take under 8 minutes (each part is capped; the caps add up to 9.5):
#   1. the GPU-marked tests (tests/test_gpu.py: the sparse-plus-low-rank CUDA path with int32 CSR and
#      sampled_addmm against dense float64, SORSA's randomized SVD on the GPU, bitsandbytes 4-bit bases);
#   2. SORSA's SVD at Llama-2-7B shapes on the GPU (benchmarks/sorsa_init.py --device cuda);
#   3. the sparse-plus-low-rank recipe for 5 steps with flash-attention 2 and packing (when flash-attn imports),
#      else with sdpa and no packing;
#   4. the speed harness (benchmarks/method_speed.py) for every method against LoRA on SmolLM2 in bfloat16;
# and writes each part's exit status, wall time and log tail to $OUT/gpu_check.json (OUT defaults to
# benchmarks/results/gpu), then prints one summary line per part. Exits non-zero when any part failed.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with the project's environment active
#
set -u
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python}; fi
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; nothing was checked" >&2
  exit 2
fi

parts=()
run_part() {  # name, timeout in seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  parts+=("$name $rc $((SECONDS - start))")
  echo "gpu_check: $name rc=$rc ($((SECONDS - start)) s)"
}

run_part gpu_tests 150 $PY -m pytest -q -m gpu tests
run_part sorsa_init 90 $PY benchmarks/sorsa_init.py --device cuda --full --out "$OUT/sorsa_init_cuda.json"
if $PY -c "import flash_attn" 2>/dev/null; then
  attn="--attn_implementation flash_attention_2 --packing true"
else
  attn="--attn_implementation sdpa"
fi
run_part recipe 150 $PY recipes/sft.py recipes/configs/sparse_low_rank_smollm2.yaml --max_steps 5 \
  --save_steps 5 --eval_max_samples 20 --reload_check false --output_dir "$OUT/recipe" $attn
run_part method_speed 180 $PY benchmarks/method_speed.py --device cuda --dtype bfloat16 --no-tiny-llama --no-convnet --repeats 4 \
  --budget 30 --init-repeats 1 --densities 0.01 --out "$OUT/method_speed_cuda_bf16.json"

$PY - "$OUT" "${parts[@]}" <<'PYEOF'
import json, sys, torch
from pathlib import Path
out, parts = Path(sys.argv[1]), [p.split() for p in sys.argv[2:]]
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "parts": {}}
for name, rc, seconds in parts:
    log = (out / f"{name}.log").read_text(errors="replace").splitlines()
    report["parts"][name] = {"rc": int(rc), "seconds": int(seconds), "log_tail": log[-15:]}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
failed = [n for n, p in report["parts"].items() if p["rc"]]
print(f"gpu_check on {report['device']}: " + ", ".join(f"{n} {'FAILED' if p['rc'] else 'ok'} ({p['seconds']} s)"
      for n, p in report["parts"].items()))
sys.exit(1 if failed else 0)
PYEOF
