"""What the command-line tools print while a stream runs: a progress bar, and names for its files.

On a terminal the bar is redrawn in place (`\\r`) at every event. Piped into a log file or a CI
job, `\\r` does not redraw anything: every update would pile onto one line hundreds of kilobytes
long (a 300-step training job wrote 300 bars on one line). There the bar prints as a plain line
at each tenth of the way instead, the way pip and docker behave without a terminal.

The files a stream yields (images, samples, downloaded adapters) are written with
impasto.atomic_files.write_file: an interrupted command never leaves half a file.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

PLAIN_LINES_PER_RUN = 10  # without a terminal: the first step, then one line per tenth


def bar(step: int, total: int, width: int = 30) -> str:
    filled = int(width * step / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"


class ProgressPrinter:
    """Prints `bar(step, total) + detail`; `message` starts its own line either way."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.redraws = bool(isatty and isatty())
        self._mid_line = False  # a redrawn bar is on the current line
        self._printed_share = -1  # without a terminal: the last tenth printed

    def update(self, step: int, total: int, detail: str = "") -> None:
        line = f"{bar(step, total)} {detail}".rstrip()
        if self.redraws:
            print(f"\r{line} ", end="", file=self.stream, flush=True)
            self._mid_line = True
            return
        share = PLAIN_LINES_PER_RUN * step // max(total, 1)
        if share > self._printed_share or step >= total:
            self._printed_share = max(share, self._printed_share)
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self._mid_line:
            print(file=self.stream)
            self._mid_line = False
        print(text, file=self.stream, flush=True)

    def restart(self) -> None:
        """Steps go on from elsewhere (a resumed job): print the next one at once when piped."""
        self._printed_share = -1


def file_slug(text: str, max_length: int = 48) -> str:
    """A file-name-safe form of a prompt: the same prompt gives the same name in every run."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return slug[:max_length].rstrip("-") or "prompt"
