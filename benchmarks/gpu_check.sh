#!/usr/bin/env bash
# Checks and times dlm-jax on one NVIDIA GPU: the real Pallas and cuDNN kernels vs the XLA reference (the gpu_only
# tests), then benchmarks/kernels.py (training attention at 1k-4k, cached attention at 1k-8k),
# train_throughput.py, block_decoding.py (speed part) and sampling.py. Writes one JSON per part (tests.json,
# kernels_attention.json, kernels_cached.json, train_throughput.json, block_decoding.json, sampling.json) and the
# full log (gpu_check.log) into RESULTS_DIR. Parts run in that order (most important first), each under a time
# limit; a part that fails or runs out of time is recorded and the next one runs, and no part starts after
# GPU_CHECK_SECONDS (default 480, 8 minutes). On an H100 (2026-11-27) the tests took about 60 s (4 workers:
# compiling dominates), attention about 150 s, cached about 55 s, train_throughput about 70 s; the last two parts
# may be cut by the budget there (docs/benchmarks.md).
#
#   benchmarks/gpu_check.sh RESULTS_DIR [--data PATH] [--offline WHEEL_DIR]
#
#   --data PATH          tinyshakespeare.txt for the trained-model parts (default ../shared/data/tinyshakespeare.txt)
#   --offline WHEEL_DIR  no network: keep the jax (with CUDA) already installed, install the project without its
#                        dependencies and the missing ones from WHEEL_DIR/*.whl. Default: pip install -e ".[gpu,test]"
set -uo pipefail

usage() { echo "usage: benchmarks/gpu_check.sh RESULTS_DIR [--data PATH] [--offline WHEEL_DIR]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
results=$1
shift
data=../shared/data/tinyshakespeare.txt
wheels=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --data) [[ $# -ge 2 ]] || usage; data=$2; shift 2 ;;
    --offline) [[ $# -ge 2 ]] || usage; wheels=$2; shift 2 ;;
    *) usage ;;
  esac
done
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, also if the editable install fails
mkdir -p "$results"
results=$(cd "$results" && pwd)
log=$results/gpu_check.log
work=${TMPDIR:-/tmp}/dlm_jax_gpu_check  # trained benchmark models (reused by a rerun on the same machine)
mkdir -p "$work"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
python=${PYTHON:-python3}
start=$SECONDS

say() { echo "[gpu_check $((SECONDS - start))s] $*" | tee -a "$log"; }

budget=${GPU_CHECK_SECONDS:-480}

# part NAME LIMIT_SECONDS COMMAND...: runs COMMAND under min(LIMIT, time left), its output into the log
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < 20)); then
    say "$name: skipped, ${left}s left of GPU_CHECK_SECONDS=$budget"
    echo "$name skipped" >>"$work/status"
    return
  fi
  ((limit > left)) && limit=$left
  say "$name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc$([[ $rc == 124 ]] && echo " (over its ${limit}s limit)")"
  echo "$name $rc" >>"$work/status"
}

: >"$log"
: >"$work/status"
say "installing"
if [[ -n $wheels ]]; then
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tee -a "$log"
  "$python" -m pip install -q --no-index --no-deps "$wheels"/*.whl 2>&1 | tee -a "$log"
else
  "$python" -m pip install -q -e ".[gpu,test]" 2>&1 | tee -a "$log"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
"$python" - <<'EOF' 2>&1 | tee -a "$log"
import importlib.metadata as md, jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
print({p: md.version(p) for p in ("jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")})
assert jax.default_backend() == "gpu", "jax sees no GPU: install jax with CUDA (pip install -e '.[gpu]')"
EOF
[[ ${PIPESTATUS[0]} == 0 ]] || { say "no GPU for jax: stopping"; exit 1; }

part tests 100 "$python" -m pytest -q -n 4 -m gpu_only tests/test_kernels.py -p no:cacheprovider \
  --junitxml="$work/tests.xml"
"$python" - "$work/tests.xml" "$results/tests.json" <<'EOF' 2>&1 | tee -a "$log"
import json, os, sys, xml.etree.ElementTree as ET
if not os.path.exists(sys.argv[1]):
    sys.exit("tests: no junit report (the run was stopped): see gpu_check.log")
cases = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
    cases.append({"test": case.get("name"), "seconds": float(case.get("time", 0)),
                  "outcome": bad[0].tag if bad else "passed", "message": bad[0].get("message", "")[:500] if bad else ""})
result = {"benchmark": "gpu_only_tests", "passed": sum(c["outcome"] == "passed" for c in cases),
          "not_passed": sum(c["outcome"] != "passed" for c in cases), "cases": cases}
json.dump(result, open(sys.argv[2], "w"), indent=2)
print(json.dumps({k: result[k] for k in ("passed", "not_passed")}))
EOF

part kernels_attention 170 "$python" benchmarks/kernels.py --skip_cached --lengths 1024,2048,4096 \
  --output "$results/kernels_attention.json"
part kernels_cached 70 "$python" benchmarks/kernels.py --skip_attention --lengths 1024,2048,4096,8192 \
  --output "$results/kernels_cached.json"
part train_throughput 90 "$python" benchmarks/train_throughput.py --output "$results/train_throughput.json"
part block_decoding 60 "$python" benchmarks/block_decoding.py --skip_quality --length 256 --steps 256 \
  --output "$results/block_decoding.json"
part sampling 120 "$python" benchmarks/sampling.py --data "$data" --mdlm_workdir "$work/shk_mdlm" \
  --ar_workdir "$work/shk_ar" --train_steps 200 --steps_list 64 --num_samples 4 --batch_size 4 \
  --cache_samples 1 --kv_samples 1 --loop_samples 1 --output "$results/sampling.json"

say "done: $(tr '\n' ' ' <"$work/status")"
rm -f "$work/status"
