"""pyproject.toml's dependency ranges and the lowest versions that `.ci/lowest` tests."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def lower_bounds(lines: list[str]) -> dict[str, Version]:
    """name -> the version of its one `>=` bound."""
    bounds = {}
    for line in lines:
        requirement = Requirement(line)
        at_least = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(at_least) == 1, f"{line!r} needs one lower bound for .ci/lowest.txt to pin"
        bounds[canonicalize_name(requirement.name)] = Version(at_least[0])
    return bounds


def pins(text: str) -> dict[str, Version]:
    """name -> version of each `name==version` line (comments and blank lines skipped)."""
    pinned = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{line!r} is not an exact pin"
        pinned[canonicalize_name(requirement.name)] = Version(spec.version)
    return pinned


def test_lowest_txt_pins_each_dependency_at_its_lower_bound() -> None:
    """A raised lower bound (the code needing a newer library) must move the tested pin
    with it, and a new dependency must get one: otherwise `.ci/lowest` tests versions the
    package no longer admits, or leaves one at its newest."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pins((ROOT / ".ci" / "lowest.txt").read_text()) == lower_bounds(declared)


def test_the_comparison_sees_a_bound_moved_without_its_pin() -> None:
    assert lower_bounds(["pillow>=10.3", "uvloop>=0.19; sys_platform != 'win32'"]) == {
        "pillow": Version("10.3.0"),
        "uvloop": Version("0.19"),
    }
    assert pins("pillow==10.0.0  # old\n\nuvloop==0.19.0\n") != lower_bounds(["pillow>=10.3"])
    with pytest.raises(AssertionError, match="needs one lower bound"):
        lower_bounds(["torch<=2.14.1"])
