#!/usr/bin/env bash
# The GPU figures of PERF.md section 5 (issue 15), in one call of the device machine:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"])          # every step
#   run(command="STEPS='fisher fisher_fp32' bash benchmarks/gpu_session.sh", carry=[".whl"])
# .whl holds the transformers 5.24.0 and tensorly 0.10.0 wheels (the machine has torch and the rest).
# Each step has its own time limit and writes its JSON lines under $OUT as it goes (stderr of all steps
# goes to $OUT/log.txt), so a slow step loses only itself.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
STEPS=${STEPS:-"grouped_kernels fisher fisher_fp32 fisher_ref fisher_kernels tucker_deepseek tucker_mixtral"}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
PY=python3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, tensorly; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'tensorly', tensorly.__version__)"
} 2>&1 | tee -a "$OUT/log.txt"
step() {  # step NAME SECONDS ARGS...: one benchmark, its JSON lines to $OUT/NAME.jsonl, the last one printed
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  echo "== $name" | tee -a "$OUT/log.txt"
  timeout "$limit" $PY "$@" 2>>"$OUT/log.txt" >"$OUT/$name.jsonl"
  echo "== $name rc=$?" | tee -a "$OUT/log.txt"; tail -n 1 "$OUT/$name.jsonl" | cut -c1-2500
}
M="--device cuda --threads 8"
step grouped_kernels 60 benchmarks/bench_fisher.py $M --shape mixtral-like --grouped-kernels
step fisher 240 benchmarks/bench_fisher.py $M --shape mixtral-like --methods ours ours_grouped_mm ours_per_expert plain --repeats 2
# exactness at float32 (bf16 backward passes differ from one another by ~1e-2 in any order of summation)
step fisher_fp32 90 benchmarks/bench_fisher.py $M --shape mixtral-like --dtype float32 --layers 2 --batches 1 --methods brute_batch ours
step fisher_ref 100 benchmarks/bench_fisher.py $M --shape mixtral-like --methods brute_batch brute_seq ours
step fisher_kernels 80 benchmarks/bench_fisher.py $M --shape mixtral-like --kernels
step tucker_deepseek 60 benchmarks/bench_tucker.py $M --shape deepseek
step tucker_mixtral 110 benchmarks/bench_tucker.py $M --shape mixtral --projections 1
