"""Start and stop the servers under test as separate processes (uvicorn with uvloop and httptools)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(
    command: list[str], env: Mapping[str, str], ready_url: str, log: Path, *, ready_status: int = 200
) -> Iterator[int]:
    """Run ``command`` in its own process group until the block ends; wait (bounded) until it answers.

    Yields the process group's id: every worker of the server is in it, so ``bench.cpu`` can count their
    CPU together."""
    with log.open("ab") as sink:
        # Commands are built by the harness from fixed parts; nothing comes from outside.
        process = subprocess.Popen(  # noqa: S603
            command, env={**os.environ, **env}, cwd=ROOT, stdout=sink, stderr=sink, start_new_session=True
        )
    try:
        _wait_ready(process, ready_url, ready_status, log)
        yield process.pid  # its own session: the process group's id is its pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(process: subprocess.Popen[bytes], url: str, status: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == status:
                return
        time.sleep(0.2)
    raise SystemExit(f"server did not become ready at {url}; see {log}")


def issuer_command(port: int, workers: int) -> list[str]:
    return [str(BIN / "issuer"), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]


def uvicorn_command(app: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
