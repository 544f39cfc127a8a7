#!/bin/bash
# The CUDA checks and paper-scale timings in one bounded run (under 9 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh [LOG]      # LOG defaults to gpu_check.log
# Runs from the repository root with the python3 that has torch (no install: PYTHONPATH; an earlier PYTHONPATH, e.g. carried wheels, stays on it).
# Each part has its own time limit, so one slow or failing part does not hide the others.
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "${1:-gpu_check.log}") 2>&1
# without a GPU every part would fail: stop at once
nvidia-smi -L || { echo "no NVIDIA GPU here (nvidia-smi failed): nothing to check"; exit 1; }
# what the parts import, named before any part starts (a machine may have torch alone)
python3 - <<'PY' || exit 1
import importlib
missing = [m for m in ("torch", "xarray", "zarr", "safetensors", "tqdm", "yaml", "numpy", "pandas", "scipy",
                       "hypothesis", "pytest", "xdist") if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"missing modules: {missing}: install them (or carry their wheels on PYTHONPATH)")
import torch
print("torch", torch.__version__, torch.cuda.get_device_name())
PY
failed=0
part() {
    local limit=$1 start=$SECONDS status; shift
    echo; echo "=== $* (limit ${limit} s, $(date +%T))"
    timeout "$limit" "$@"
    status=$?
    echo "=== exit status $status after $((SECONDS - start)) s"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}
# most telling first: the engine's brute-force tests with every explain() on the GPU, one line
# per test so that a part stopped at its limit still says which passed (the cube round trip
# needs zarr: carry its wheels where the machine lacks it). Two threads per worker: the training
# loops and the brute force run on the CPU, and 8 workers with torch's one thread per core each
# would oversubscribe the cores.
part 200 env EXPLAIND_TEST_DEVICE=cuda OMP_NUM_THREADS=2 python3 -m pytest tests/test_engine.py \
    -p no:cacheprovider -p no:benchmark -n 8 -v --tb=short -rf
part 40 python3 benchmarks/reference_workload.py --quick --repeat 2 --device cuda --phases
part 30 python3 benchmarks/paper_scale.py contraction
part 100 python3 benchmarks/paper_scale.py transformer --steps 3 --tests 500 --views data
part 90 python3 benchmarks/paper_scale.py transformer --steps 2 --views grokking
part 60 python3 benchmarks/paper_scale.py resnet --steps 3 --tests 100
echo; echo "=== $failed part(s) failed"
exit $((failed > 0))
