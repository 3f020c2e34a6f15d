"""Check that ci/oldest.txt pins each package at the oldest release the project allows.

Run with the oldest venv's python after ``pip install -e ".[test,server]" -c ci/oldest.txt``. For
every pin, the floor is the highest ``>=`` (or ``==``/``~=``) bound on that package in the
requirements of the installed distributions: signal_queue's own (pyproject.toml's dependencies and
the extras below) and those of its dependencies (Flask 3.0.0's Werkzeug>=3.0.0, ...). The pin must
equal that floor, so a floor raised in pyproject.toml without moving the pin (or the reverse) fails.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

OLDEST = Path(__file__).resolve().parent / "oldest.txt"
PROJECT = canonicalize_name("signal_queue")
EXTRAS = ("test", "server", "login")


def pins() -> dict[NormalizedName, tuple[Version, Version]]:
    """name -> (pinned version, the floor it stands for)."""
    out = {}
    for line in OLDEST.read_text().splitlines():
        pin, _, comment = (part.strip() for part in line.partition("#"))
        if not pin:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", pin)
        if match is None:
            raise SystemExit(f"ci/oldest.txt: not NAME==VERSION: {line!r}")
        stands_for = re.fullmatch(r"oldest release >= (\S+)", comment)
        version = Version(match[2])
        out[canonicalize_name(match[1])] = (version, Version(stands_for[1]) if stands_for else version)
    return out


def floors() -> dict[NormalizedName, tuple[Version, str]]:
    """name -> (highest lower bound any installed requirement puts on it, that requirement)."""
    out: dict[NormalizedName, tuple[Version, str]] = {}
    for dist in metadata.distributions():
        owner = canonicalize_name(dist.metadata["Name"])
        extras = ("", *EXTRAS) if owner == PROJECT else ("",)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
                continue
            for spec in req.specifier:
                if spec.operator in (">=", "==", "~=") and "*" not in spec.version:
                    version = Version(spec.version)
                    name = canonicalize_name(req.name)
                    if name not in out or version > out[name][0]:
                        out[name] = (version, f"{dist.metadata['Name']} {dist.version} requires {text}")
    return out


def main() -> int:
    bounds = floors()
    pinned_all = pins()
    bad = 0
    for name, (pinned, stands_for) in pinned_all.items():
        floor, why = bounds.get(name, (None, "no lower bound anywhere"))
        installed = Version(metadata.version(name))
        if floor != stands_for or installed != pinned:
            print(f"ci/oldest.txt: {name}=={pinned}, installed {installed}, oldest allowed {floor} ({why})")
            bad += 1
    if bad:
        return 1
    print(f"ci/oldest.txt: all {len(pinned_all)} pins are the oldest releases allowed and are installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
