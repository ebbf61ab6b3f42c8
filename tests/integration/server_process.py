"""An impasto server in its own OS process (`python -m impasto.cli serve`), for the tests that
need what the in-process server of conftest.py cannot give: a SIGKILL that runs no shutdown code
at all, then a new process on the same data directory.

    with ServerProcesses(tmp_path) as servers:
        server = servers.start(data_dir)
        ...  # ImpastoClient(server.target)
        server.kill()  # kill -9

Each process writes stdout and stderr to its own log file. `ServerProcesses` kills whatever it
started when the block ends, however it ends, and prints the tail of every log when the block
fails (pytest shows it with the failure).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# Printed by `impasto serve` once the port listens and the default model is loaded.
READY_LINE = re.compile(r"^impasto: serving on (\S+):(\d+)$", re.MULTILINE)


class ServerProcess:
    def __init__(self, data_dir: Path, log_path: Path):
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.target = ""

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        # One thread everywhere: the test machine is shared, and thread-count changes would
        # change the floating-point sums of a training run (its bit-for-bit comparisons).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "IMPASTO_DATA_DIR": str(self.data_dir)}
        command = [sys.executable, "-m", "impasto.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--threads", "1"]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.log_path.parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = READY_LINE.search(self.log_text())
            if ready:
                self.target = f"{ready.group(1)}:{ready.group(2)}"
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} before serving; see {self.log_path}")
            time.sleep(0.05)
        raise TimeoutError(f"the server did not say it was serving within {timeout:.0f}s; see {self.log_path}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, timeout: float = 30.0) -> None:
        """kill -9: no signal handler, no `finally`, no graceful stop of the training worker."""
        if self.running:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, num_lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-num_lines:])


class ServerProcesses:
    """Starts server processes with numbered logs in `folder`; kills them all on exit."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.started: list[ServerProcess] = []

    def start(self, data_dir: Path, timeout: float = 180.0) -> ServerProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        server = ServerProcess(data_dir, self.folder / f"server-{len(self.started) + 1}.log")
        self.started.append(server)
        return server.start(timeout)

    def __enter__(self) -> "ServerProcesses":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for server in self.started:
            try:
                server.kill()
            except Exception as error:  # keep killing the others; the test's own error wins
                print(f"could not kill {server.log_path.name}: {error!r}")
        if exc_type is not None:
            for server in self.started:
                print(f"--- last lines of {server.log_path} ---\n{server.log_tail()}")
        return False
