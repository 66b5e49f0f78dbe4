"""requirements.lock (what README command 1 and .ci/run install) must satisfy requirements.txt's
ranges, pin every package exactly, and hold no CUDA package (torch is the CPU build here)."""
import os

from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def requirement_lines(name):
    """The requirement of each non-comment line of a requirements file (inline comments cut)."""
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        lines = [line.split(" #")[0].strip() for line in f]
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


def locked_versions(lines):
    """{canonical name: Version} of a lock's `name==version` lines; anything else fails."""
    pins = {}
    for requirement in lines:
        (specifier,) = requirement.specifier  # exactly one, and it is ==
        assert specifier.operator == "==" and "*" not in specifier.version, f"not pinned: {requirement}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = Version(specifier.version)
    return pins


def unsatisfied(ranges, pins):
    """The requirements of `ranges` that `pins` lacks or pins outside the range."""
    problems = []
    for requirement in ranges:
        version = pins.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement.name}: not in the lock")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}: lock has {version}, "
                            f"requirements.txt wants {requirement.specifier}")
    return problems


def test_lock_satisfies_every_range_of_requirements_txt():
    ranges = requirement_lines("requirements.txt")
    assert len(ranges) >= 10
    assert unsatisfied(ranges, locked_versions(requirement_lines("requirements.lock"))) == []


def test_lock_pins_the_transitive_packages_too_and_nothing_cuda():
    pins = locked_versions(requirement_lines("requirements.lock"))
    for package in ("tokenizers", "huggingface-hub", "numpy", "filelock", "setuptools", "accelerate",
                    "tensorboard-data-server"):
        assert package in pins, package  # dependencies of our dependencies
    assert [name for name in pins if name.startswith("nvidia-") or name == "triton"] == []
    assert pins["torch"] == Version("2.13.0")


def test_the_check_finds_a_lock_that_does_not_satisfy():
    ranges = [Requirement("transformers>=5.24,<6"), Requirement("tqdm>=4.60")]
    pins = {"transformers": Version("5.23.0")}
    assert unsatisfied(ranges, pins) == ["transformers: lock has 5.23.0, requirements.txt wants <6,>=5.24",
                                         "tqdm: not in the lock"]


def test_readme_and_ci_install_from_the_lock():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.lock "
            "&& bash demo.sh" in readme)
    assert ("pip install -q -r requirements.lock" in ci
            and "requirements.txt" not in ci.split("pip install")[1])
