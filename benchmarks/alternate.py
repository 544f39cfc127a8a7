"""Benchmark: the reference workload against an earlier revision of explaind, call by call.

Timings of the same code drift by up to 40% between runs on the 2-core development machines, so
a change is judged by calls that alternate, in one process, between the working tree's explaind
and the package at a git revision (extracted to a temporary folder and imported under another
name, which its relative imports allow). Each round runs one call of each, the first in turn.

    python benchmarks/alternate.py HEAD~1                       # 10 calls each, every kink located
    python benchmarks/alternate.py HEAD~3 --calls 16 --setting plain
    python benchmarks/alternate.py HEAD~1 --inputs 2    # 2 test inputs: 50 rows, a backward walk

Prints, for each code: the median and best wall time, the median CPU time of the process (both
threads) and the median seconds of each phase (explaind.phases); then the largest difference
between the two cubes' attributions and each cube's max |residual|. The workload and its settings
are reference_workload.py's (--setting: exact, tolerance for kink_tolerance=1e-6, plain).
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import explaind
from reference_workload import positive, request

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"exact": dict(breakpoints=True, kink_tolerance=0.0),
            "tolerance": dict(breakpoints=True, kink_tolerance=1e-6),
            "plain": dict(breakpoints=False, kink_tolerance=0.0)}


def package_at(revision: str, folder: Path):
    """explaind as it was at `revision`, imported as explaind_at_revision from `folder`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision, "explaind"],
                             capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git cannot archive explaind at {revision!r}: {archive.stderr.decode().strip()}. "
                         "Fix: name a revision of this repository (a commit, tag or HEAD~n)")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # the archive is this repository's own; the filter argument exists from Python 3.11.4 and 3.10.12
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    name = "explaind_at_revision"
    (folder / "explaind").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def timed_call(package, arguments) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, CPU seconds, seconds per phase) of one explain call of `package` (no
    phases for a revision from before explaind.phases)."""
    path, model, test, kwargs = arguments
    timer = getattr(package, "phases", None)
    with timer.timed() if timer else nullcontext({}) as phases:
        wall, cpu = time.perf_counter(), time.process_time()
        package.explain(path, model, test, progress=False, **kwargs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, {name.removeprefix(timer.PREFIX): seconds for name, seconds in phases.items()}


def report(label: str, calls: list[tuple[float, float, dict[str, float]]]) -> None:
    walls, cpus, phases = zip(*calls)
    medians = {name: statistics.median(p.get(name, 0.0) for p in phases) for name in sorted(set().union(*phases))}
    if not medians:
        medians = {"(no phases at this revision)": float("nan")}
    print(f"{label:10s} wall median {statistics.median(walls):.3f} s, best {min(walls):.3f} s; "
          f"CPU median {statistics.median(cpus):.3f} s")
    print(" " * 11 + ", ".join(f"{name} {seconds:.3f}" for name, seconds in medians.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the git revision to compare with (HEAD~1, a commit, a tag)")
    parser.add_argument("--calls", type=positive, default=10, help="timed calls of each code, after a first one")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="exact", help="reference_workload's setting")
    parser.add_argument("--inputs", type=positive, default=10,
                        help="test inputs explained (fewer than 8: fewer rows than training samples, a backward walk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        earlier = package_at(args.revision, Path(tmp) / "package")
        path, model, test, kwargs = arguments = request(Path(tmp), n_test=args.inputs, **SETTINGS[args.setting])
        codes = {"working": explaind, args.revision: earlier}
        cubes = {label: package.explain(path, model, test, progress=False, **kwargs) for label, package in codes.items()}
        calls = {label: [] for label in codes}
        for round_ in range(args.calls):
            for label in (list(codes) if round_ % 2 == 0 else list(codes)[::-1]):
                calls[label].append(timed_call(codes[label], arguments))
        print(f"reference workload, {args.setting} setting, {args.inputs} test inputs, {args.calls} calls of each code, "
              "alternating")
        for label, taken in calls.items():
            report(label, taken)
        new, old = (cubes[label] for label in codes)
        print(f"max |difference| of the attributions {float(abs(new['attribution'] - old['attribution']).max()):.2e} "
              f"(largest entry {float(abs(old['attribution']).max()):.3g}); max |residual| "
              f"{float(abs(new['residual']).max()):.2e} working, {float(abs(old['residual']).max()):.2e} at "
              f"{args.revision}")


if __name__ == "__main__":
    main()
