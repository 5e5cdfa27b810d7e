"""Print constraints.txt: the exact installed version of every package that
``pip install '.[test,postgres]'`` (what .ci/run installs) brings in, read from this
environment. Run it after installing and testing new versions:

    python scripts/freeze_constraints.py > constraints.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("test", "postgres")  # the extras .ci/run installs


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 normalised name


def _applies(req: Requirement, extras: tuple[str, ...]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras or ("",))


def sweep_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def closure() -> dict[str, str]:
    """Installed name -> version for the requirements and everything they require in turn."""
    pinned: dict[str, str] = {}
    todo = [(req, ()) for req in sweep_requirements()]
    while todo:
        req, extras = todo.pop()
        if not _applies(req, extras):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"error: {req.name} is required but not installed; install "
                     f"'.[{','.join(EXTRAS)}]' first")
        name = dist.metadata["Name"]
        seen = name in pinned
        pinned[name] = dist.version
        if seen and not req.extras:
            continue
        wanted = tuple(sorted(req.extras))
        todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return pinned


def main() -> None:
    print("# Exact versions CI installs: pip install -e '.[test,postgres]' -c constraints.txt")
    print("# Regenerate: python scripts/freeze_constraints.py > constraints.txt")
    for name, version in sorted(closure().items(), key=lambda kv: _key(kv[0])):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
