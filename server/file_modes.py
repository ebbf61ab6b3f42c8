"""Give a temporary file or folder the mode a plain `open` / `mkdir` would have given it.

Our atomic writes build a result under a temporary name from `tempfile.mkstemp` / `mkdtemp`
and rename it into place. Those create 0600 files and 0700 folders whatever the umask, for the
temporary's own safety; renamed as they are, a prepared dataset, a fused model, an engine folder
or a downloaded adapter would be unreadable to anyone but their writer (a server running as
another user, a container with another uid). So before the rename the temporary gets the usual
mode: 0666 / 0777 less the umask.
"""

from __future__ import annotations

import os
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
