"""Results written whole or not at all, with the mode a plain `open` / `mkdir` would give them.

Every result a user keeps (an adapter, a fused model, an engine folder, a prepared dataset, an
image from the CLI) is built under a temporary name in the destination's folder and moved into
place with one rename, so a reader never sees half of it and a crash leaves the old one intact.

`tempfile.mkstemp` / `mkdtemp` make those temporaries 0600 / 0700 whatever the umask, for their
own safety. Renamed as they are, a dataset prepared by one user, or an adapter downloaded in a
container, would be unreadable to a server running as another. So before the rename the
temporary gets the usual mode: 0666 / 0777 less the umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    # /proc tells it without changing it; os.umask can only read it by setting it, which would
    # race with threads creating files meanwhile.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: str | os.PathLike) -> Path:
    """chmod `path` to 0666 (a file) or 0777 (a folder) less the umask. A folder's contents are
    left alone: what was written into it with plain `open` / `mkdir` already has its mode."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())
    return path


@contextlib.contextmanager
def replacing_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; write it, and on success it becomes `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(usual_mode(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    with replacing_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it becomes `final` in one rename.

    `final` existing is an error unless `overwrite`; then the old folder is moved aside, the new
    one renamed in, and the old one deleted (a directory cannot be replaced by one rename).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        usual_mode(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.rmdir(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
