"""Leave in a virtual environment only what the relay needs at run time.

The Docker build installs the whole lock file (requirements.txt holds the runtime and
the development packages in one resolution, every file checked against its hash), then
runs this with the environment's own Python: it walks the relay's declared requirements
(with their extras and markers) through the installed packages' metadata and uninstalls
everything outside that closure, such as pytest, mypy, ruff or playwright. The runtime
versions are therefore exactly the locked ones, with no second lock file to keep in step.

    python deploy/prune-to-runtime.py [--dry-run] [--project amazon-capi-relay]
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys

from packaging.requirements import Requirement

KEEP_ALWAYS = {"pip"}  # uninstalls the rest; the image's own Python has one too


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(project: str) -> set[str]:
    """Canonical names of ``project`` and everything it needs, extras included."""
    needed: set[str] = set()
    pending: list[tuple[str, frozenset[str]]] = [(project, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        needed.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded or optional package that is not installed
        for text in dist.requires or []:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(
                requirement.marker.evaluate(env) for env in environments
            ):
                pending.append((canonical(requirement.name), frozenset(requirement.extras)))
    return needed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="amazon-capi-relay")
    parser.add_argument("--dry-run", action="store_true", help="print, do not uninstall")
    args = parser.parse_args()
    keep = runtime_closure(canonical(args.project)) | KEEP_ALWAYS
    installed = {canonical(d.metadata["Name"]) for d in metadata.distributions()}
    if canonical(args.project) not in installed:
        sys.exit(f"{args.project} is not installed in this environment")
    remove = sorted(installed - keep)
    print(f"keeping {len(installed & keep)} packages, removing {len(remove)}: {' '.join(remove)}")
    if remove and not args.dry_run:
        # The names come from this environment's own installed distributions.
        subprocess.run(  # noqa: S603
            [sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", *remove], check=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
