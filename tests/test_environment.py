"""environment.yml (conda) and pyproject.toml (pip) must declare the same dependencies.

The conda file lists pyproject's dependencies and the `pipeline` and `dev` extras in its pip
section; these tests fail on any drift (a package added to one file only, a changed version
range, another Python) and check that the environment running them satisfies pyproject.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def pyproject_requirements(pyproject: dict, extras: tuple[str, ...] = ("pipeline", "dev")) -> dict[str, Requirement]:
    """Dependencies plus the given extras, following self-references like explaind[pipeline]."""
    name = canonicalize_name(pyproject["project"]["name"])
    optional = pyproject["project"].get("optional-dependencies", {})
    found: dict[str, Requirement] = {}
    lines, wanted, seen = list(pyproject["project"]["dependencies"]), list(extras), set()
    while lines or wanted:
        if not lines:
            extra = wanted.pop()
            assert extra in optional, f"pyproject has no extra {extra!r}"
            if extra not in seen:
                seen.add(extra)
                lines = list(optional[extra])
            continue
        requirement = Requirement(lines.pop())
        if canonicalize_name(requirement.name) == name:
            wanted.extend(requirement.extras)  # e.g. explaind[pipeline] inside the dev extra
        else:
            found[canonicalize_name(requirement.name)] = requirement
    return found


def conda_pip_section(environment: dict) -> list[str]:
    sections = [item["pip"] for item in environment["dependencies"] if isinstance(item, dict) and "pip" in item]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return sections[0]


def environment_drift(pyproject: dict, environment: dict) -> list[str]:
    """Differences between pyproject's requirements and environment.yml's pip section."""
    expected = pyproject_requirements(pyproject)
    listed = {}
    for line in conda_pip_section(environment):
        if line.startswith("-"):  # pip options such as `-e .`
            continue
        requirement = Requirement(line)
        listed[canonicalize_name(requirement.name)] = requirement
    problems = [f"{name} is missing from environment.yml" for name in sorted(set(expected) - set(listed))]
    problems += [f"{name} is not in pyproject.toml" for name in sorted(set(listed) - set(expected))]
    for name in sorted(set(expected) & set(listed)):
        if (expected[name].specifier, expected[name].extras) != (listed[name].specifier, listed[name].extras):
            problems.append(f"{name}: pyproject.toml has {expected[name]}, environment.yml has {listed[name]}")
    return problems


def test_environment_lists_the_same_requirements_as_pyproject(pyproject, environment):
    problems = environment_drift(pyproject, environment)
    assert not problems, "environment.yml drifted from pyproject.toml; change both together:\n" + "\n".join(problems)


def test_drift_is_detected(pyproject, environment):
    import copy

    drifted = copy.deepcopy(environment)
    pip = conda_pip_section(drifted)
    removed, loosened = (Requirement(line).name for line in pip[:2])
    pip[0] = "requests"  # one package replaced by another, one range changed
    pip[1] = loosened
    problems = environment_drift(pyproject, drifted)
    assert len(problems) == 3
    assert f"{removed} is missing" in problems[0] and "requests is not in pyproject" in problems[1]
    assert problems[2].startswith(f"{loosened}: pyproject.toml has")


def test_environment_installs_the_package_itself(environment):
    assert "-e ." in conda_pip_section(environment), "environment.yml must end with `-e .` (explaind itself)"


def test_environment_python_satisfies_requires_python(pyproject, environment):
    pythons = [d for d in environment["dependencies"] if isinstance(d, str) and re.match(r"python\b", d)]
    assert len(pythons) == 1, f"environment.yml must pin python once, found {pythons}"
    version = pythons[0].split("=", 1)[1].lstrip("=")
    assert version == "3.11", f"environment.yml pins python {version}; CI runs 3.11"
    assert Version(version) in SpecifierSet(pyproject["project"]["requires-python"])
    assert "pip" in environment["dependencies"], "environment.yml must install pip for its pip section"


def test_makefile_installs_existing_extras(pyproject):
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r"^EXTRAS \?= *(\S+)", makefile, re.M).group(1).split(",")
    assert set(extras) <= set(pyproject["project"]["optional-dependencies"])


def test_installed_packages_satisfy_pyproject(pyproject):
    """The environment running the tests is the one pyproject describes (`make setup` is current)."""
    problems = []
    for name, requirement in pyproject_requirements(pyproject).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{name} {installed} is outside {requirement.specifier}")
    assert not problems, "run `make setup` (or pip install -e '.[dev]'): " + "; ".join(problems)


def test_cpu_torch_brings_no_cuda_libraries():
    """A CPU build of torch must not drag in the multi-GB nvidia-* wheels (the pin keeps it so)."""
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch is installed on purpose")
    nvidia = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                    if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
    assert not nvidia, f"CPU torch install pulled in CUDA libraries: {nvidia}"
