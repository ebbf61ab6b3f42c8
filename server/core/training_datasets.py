"""Training datasets: folders under `<data dir>/datasets/`, uploaded through the API or put there
(e.g. by `impasto prep --out <data dir>/datasets/<name>`).

A job names its dataset by folder name only. Absolute paths, `..`, separators and anything
that resolves outside the datasets directory (a symlink out) are refused: a client must never
make the server read a file it chose. Uploads are written to a temporary folder beside the final
one and renamed into place when complete, so a dataset is either whole or absent.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

from .errors import AlreadyExists, InvalidArgument, NotFound

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_FILE_DEPTH = 3


def check_dataset_name(name: str, field: str = "dataset") -> str:
    if not name:
        raise InvalidArgument(field, "must name a dataset folder under the server's data directory")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        raise InvalidArgument(field, f"{name!r}: absolute paths are refused; name a folder under the server's data directory")
    if ".." in re.split(r"[\\/]", name):
        raise InvalidArgument(field, f"{name!r}: '..' is refused; name a folder under the server's data directory")
    if not NAME_PATTERN.match(name) or ".." in name:
        raise InvalidArgument(field, f"{name!r} must be a folder name: 1-100 letters, digits, '.', '_' or '-', no separators")
    return name


def check_file_path(path: str) -> PurePosixPath:
    """A file path inside an uploaded dataset: relative, '/'-separated, no `..`, a few levels deep."""
    if not path or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path) or "\\" in path:
        raise InvalidArgument("file.path", f"{path!r}: must be a relative '/'-separated path")
    parts = PurePosixPath(path).parts
    if any(p in ("..", ".", "") for p in parts) or len(parts) > MAX_FILE_DEPTH:
        raise InvalidArgument("file.path", f"{path!r}: '..', '.' and more than {MAX_FILE_DEPTH} levels are refused")
    if any(p.startswith(".") for p in parts):
        raise InvalidArgument("file.path", f"{path!r}: hidden files are refused")
    return PurePosixPath(*parts)


class DatasetStore:
    def __init__(self, data_dir: Path, max_bytes: int):
        self.root = Path(data_dir) / "datasets"
        self.max_bytes = max_bytes

    def resolve(self, name: str, field: str = "dataset") -> Path:
        check_dataset_name(name, field)
        root = self.root.resolve()
        folder = (self.root / name).resolve()
        if folder.parent != root:
            raise InvalidArgument(field, f"{name!r} resolves outside the datasets directory; refused")
        if not folder.is_dir():
            known = ", ".join(sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))) if self.root.is_dir() else ""
            raise InvalidArgument(field, f"no dataset {name!r} under {self.root}; known: {known or 'none'}")
        return folder

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    async def upload(self, name: str, files: AsyncIterator[tuple[str, bytes]]) -> tuple[int, int]:
        """Store a dataset from (path, bytes) pairs; returns (number of files, bytes)."""
        check_dataset_name(name, "header.name")
        final = self.root / name
        if final.exists():
            raise AlreadyExists(f"dataset: {name!r} exists; choose another name")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".upload-{name}.", dir=self.root))
        total, count, seen = 0, 0, set()
        try:
            async for path, data in files:
                rel = check_file_path(path)
                if rel in seen:
                    raise InvalidArgument("file.path", f"{path!r} is sent twice")
                seen.add(rel)
                total += len(data)
                if total > self.max_bytes:
                    raise InvalidArgument("file.data", f"the dataset passed {self.max_bytes} bytes (training.max_dataset_bytes)")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                count += 1
            if count == 0:
                raise InvalidArgument("file", "the upload holds no files")
            if final.exists():
                raise AlreadyExists(f"dataset: {name!r} exists; choose another name")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return count, total

    def delete(self, name: str) -> None:
        folder = self.resolve(name)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)

    def require(self, name: str) -> Path:
        try:
            return self.resolve(name)
        except InvalidArgument as exc:
            raise NotFound(str(exc)) from None
