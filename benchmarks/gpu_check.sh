#!/bin/bash
# The CUDA checks and paper-scale timings in one bounded run (about 8 minutes on one H100/H200):
#   bash benchmarks/gpu_check.sh [LOG]      # LOG defaults to gpu_check.log
# Runs from the repository root with the python3 that has torch (no install needed: PYTHONPATH).
# Each part has its own time limit, so one slow or failing part does not hide the others.
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee "${1:-gpu_check.log}") 2>&1
# without a GPU every part would fail: stop at once
nvidia-smi -L || { echo "no NVIDIA GPU here (nvidia-smi failed): nothing to check"; exit 1; }
python3 -c "import torch, xarray; print('torch', torch.__version__, 'xarray', xarray.__version__, torch.cuda.get_device_name())" || exit 1
failed=0
part() {
    local limit=$1 start=$SECONDS status; shift
    echo; echo "=== $* (limit ${limit} s, $(date +%T))"
    timeout "$limit" "$@"
    status=$?
    echo "=== exit status $status after $((SECONDS - start)) s"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}
part 40 python3 benchmarks/paper_scale.py contraction
part 90 python3 benchmarks/paper_scale.py transformer --steps 20 --views data
part 60 python3 benchmarks/paper_scale.py transformer --steps 20 --views grokking
part 80 python3 benchmarks/paper_scale.py resnet --steps 6
part 40 python3 benchmarks/reference_workload.py --quick --repeat 2 --device cuda
# the engine's brute-force tests with every explain() on the GPU (the cube round trip needs zarr)
part 120 env EXPLAIND_TEST_DEVICE=cuda python3 -m pytest tests/test_engine.py -q -p no:cacheprovider \
    --maxfail=5 --deselect tests/test_engine.py::test_save_and_open_cube_round_trip
echo; echo "=== $failed part(s) failed"
exit $((failed > 0))
