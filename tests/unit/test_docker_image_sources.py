"""The Dockerfile copies what the package is built from.

The image installs impasto from the folders its COPY lines bring in; a package folder added to
pyproject.toml but not to the Dockerfile would build an image that fails at import. (This
machine has no Docker daemon; the install steps themselves were run by hand in a fresh venv.)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _copied() -> set[str]:
    sources = set()
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*COPY\s+(.+)$", line)
        if m and not m[1].startswith("--from"):
            sources.update(m[1].split()[:-1])  # the last word is the destination
    return sources


def test_every_package_folder_and_build_input_is_copied():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = folders | {"proto", "clients", "scripts/gen_proto.py", "pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= _copied(), f"the Dockerfile does not COPY {sorted(needed - _copied())}"


def test_generated_and_local_files_stay_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    generated = [line for line in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines() if "_pb2" in line]
    assert generated and set(generated) <= set(ignored)
    assert {".venv", "**/__pycache__"} <= set(ignored)
