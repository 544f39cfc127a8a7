"""For the workers of tests/test_distributed.py: log the parts a process computes (not those it
reads back), one rank a line, to computed.log in parts_dir."""

from pathlib import Path

import explaind.distributed as distributed


def log_computed_parts(parts_dir: str) -> None:
    compute = distributed.explain_shard

    def counted(*args, rank, **kwargs):
        with open(Path(parts_dir) / "computed.log", "a") as log:  # appended whole: one short write
            log.write(f"{rank}\n")
        return compute(*args, rank=rank, **kwargs)

    distributed.explain_shard = counted
