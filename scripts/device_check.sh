#!/usr/bin/env bash
# The device check: one call on a CUDA machine runs everything that needs a GPU and keeps the results.
#
#   scripts/device_check.sh [--dry-run] OUT        (make device-check OUT=dir [DRY_RUN=1])
#
# For a machine with no network whose python3 already has torch (a CUDA build), CuPy (cupy-cuda13x or
# cupy-cuda12x), numba, numba-cuda, scipy, pytest, pytest-benchmark and hypothesis. Wheels of anything
# else (routing-transformer and its needs, for the lucidrains target) are installed, offline, from
# $WHEELS (default .whl) if that folder exists. Stages, each with its own time limit, the whole within
# DEADLINE seconds (default 525, under 9 minutes): the environment; installing the project; then side
# by side the conformance suite of torch (on every device it declares), cupy and numba_cuda, and the
# CUDA tests; then the benchmark's targets and a short sweep with plots. Results go to OUT: one log per
# stage, the conformance reports and targets as JSON, the CUDA tests as JUnit XML, the CuPy memory peaks,
# the sweep; summary.txt says what ran, how long and with what exit status; all-results.tar.gz holds
# everything (for callers that can bring back few files). --dry-run prints the stages and checks the
# environment only, on any machine. The exit status is 0 when every stage passed.
set -uo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
out="${1:-device-check}"
python="${PYTHON:-python3}"
wheels="${WHEELS:-.whl}"
deadline="${DEADLINE:-525}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.txt"
start=$SECONDS
failed=0

device_tests=(tests/test_cupy_gpu.py tests/test_torch_fsat.py tests/test_torch_routing.py
              tests/test_torch_fsat_module.py tests/test_torch_routing_module.py)
# stage name, time limit in seconds, command (run by bash in the repository, after the install)
stages=(
  "conformance-torch|240|$python -m refattn conformance --backend torch --json $out/conformance-torch.json"
  "conformance-cupy|240|$python -m refattn conformance --backend cupy --json $out/conformance-cupy.json"
  "conformance-numba_cuda|240|NUMBA_ENABLE_CUDASIM=0 $python -m refattn conformance --backend numba_cuda --json $out/conformance-numba_cuda.json"
  "cuda-tests|240|REFATTN_DEVICE_CHECK_OUT=$out $python -m pytest -q -p no:cacheprovider ${device_tests[*]} -k 'cuda or gpu or device' --junitxml=$out/cuda-tests.xml"
  "bench-targets|150|$python -m refattn bench --targets --device cuda --json $out/targets.json"
  "bench-sweep|60|$python -m refattn bench --device cuda --backend torch --backend cupy --backend numba_cuda --length 4096 --length 16384 --direction fwdbwd --repeats 3 --max-seconds 10 --no-progress --out $out/bench"
)
parallel=4  # the first four stages run side by side: small shapes, bound by the CPU more than by the GPU

environment() {
  "$python" - <<'EOF'
import importlib, importlib.metadata, platform, shutil, subprocess, sys
print(f"python {platform.python_version()} at {sys.executable}" + ("" if sys.version_info >= (3, 10) else "  (needs 3.10+)"))
for name in ("numpy", "scipy", "setuptools", "torch", "cupy", "numba", "numba_cuda", "pytest", "pytest_benchmark",
             "hypothesis", "matplotlib", "tqdm", "routing_transformer"):
    try:
        module = importlib.import_module(name)
        print(f"{name:20} {getattr(module, '__version__', 'present')}")
    except Exception as error:  # missing, or broken without a driver
        print(f"{name:20} MISSING ({type(error).__name__}: {str(error)[:80]})")
cupy_dists = [d.metadata["Name"] for d in importlib.metadata.distributions() if d.metadata["Name"].startswith("cupy-cuda")]
print(f"{'cupy distribution':20} {', '.join(cupy_dists) or 'none'} (any cupy-cuda* is accepted)")
checks = {
    "torch CUDA": "import torch; print(torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))",
    "cupy devices": "import cupy; print(cupy.cuda.runtime.getDeviceCount())",
    "numba CUDA": "from numba import cuda; print(cuda.is_available())",
}
for label, code in checks.items():
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    answer = done.stdout.strip() or done.stderr.strip().splitlines()[-1][:100] if done.stdout or done.stderr else "?"
    print(f"{label:20} {answer}")
smi = shutil.which("nvidia-smi")
query = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
print(f"{'nvidia-smi':20} " + (subprocess.run([smi, *query], capture_output=True, text=True).stdout.strip()
                                if smi else "MISSING (no NVIDIA driver here)"))
EOF
}

record() {  # name, seconds, status
  printf '%-24s %6ss  %s\n' "$1" "$2" "$3" | tee -a "$summary"
}

run_stage() {  # name, limit, command; the limit shrinks to what is left of the deadline
  local name="$1" limit="$2" command="$3" left=$((deadline - (SECONDS - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 5 ]; then record "$name" 0 "not run: the deadline was reached"; return 1; fi
  local began=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "$command" >"$out/$name.log" 2>&1
  local status=$?
  local verdict="exit $status"
  [ $status -eq 124 ] && verdict="stopped at its ${limit}s limit"
  [ $status -eq 0 ] && verdict="passed"
  record "$name" $((SECONDS - began)) "$verdict"
  return $status
}

echo "refattn device check -> $out (deadline ${deadline}s)" | tee "$summary"
echo "stages (name | time limit s | command):"
echo "  environment | 60 | python imports, torch/cupy/numba devices, nvidia-smi"
echo "  install | 90 | $python -m pip install --no-deps --no-build-isolation -e .  (+ wheels in $wheels, if any)"
for stage in "${stages[@]}"; do echo "  $stage"; done
echo "  (the first $parallel run side by side; then the others in order)"
echo "== environment" | tee -a "$summary"
environment | tee "$out/environment.txt" | tee -a "$summary"
if [ $dry_run -eq 1 ]; then
  echo "dry run: nothing installed or run; the environment above is what the stages would find" | tee -a "$summary"
  exit 0
fi

install="$python -m pip install --no-deps --no-build-isolation -e ."
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  install="$python -m pip install --no-index --no-deps $wheels/*.whl && $install"
fi
run_stage install 90 "$install" || { failed=1; record all 0 "stopped: the project is not installed"; }
if [ $failed -eq 0 ]; then
  pids=()
  for stage in "${stages[@]:0:$parallel}"; do
    IFS='|' read -r name limit command <<<"$stage"
    run_stage "$name" "$limit" "$command" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  for stage in "${stages[@]:$parallel}"; do
    IFS='|' read -r name limit command <<<"$stage"
    run_stage "$name" "$limit" "$command" || failed=1
  done
fi
record total $((SECONDS - start)) "$([ $failed -eq 0 ] && echo "every stage passed" || echo "some stage failed")"
tar -czf "$out/all-results.tar.gz" -C "$out" --exclude all-results.tar.gz . 2>/dev/null
exit $failed
