"""Worker of tests/test_distributed.py, launched by torchrun: explain a history in shards."""

import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny cases
from computed_parts import log_computed_parts  # noqa: E402
from engine_cases import Case  # noqa: E402

from explaind.cube import save_cube  # noqa: E402
from explaind.distributed import explain_distributed  # noqa: E402

history, model_kind, opt, split, parts_dir, out = sys.argv[1:7]
log_computed_parts(parts_dir)
inputs = load_file(Path(parts_dir) / "inputs.safetensors")["inputs"]
cube = explain_distributed(
    history, Case(model=model_kind, opt=opt).fresh_model(), inputs, split=split,
    parts_dir=parts_dir, step_bins=3, components="module", quadrature=6,
)
if cube is not None:
    save_cube(cube, out)
