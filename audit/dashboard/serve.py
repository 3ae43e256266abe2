"""Run the dashboard as a real Streamlit server on a localhost port (browser test, screenshots)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["APP", "free_port", "serve", "streamlit_command"]

APP = Path(__file__).resolve().parents[2] / "app.py"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def streamlit_command(host: str, port: int, *, app: Path = APP) -> list[str]:
    """The ``streamlit run`` command line for the dashboard, as ``audit dashboard`` and :func:`serve` run it.

    Origin checks are switched on explicitly (XSRF protection and CORS), so a
    ``config.toml`` that turned them off does not apply to the dashboard: a page
    on another site cannot drive a reviewer's session.
    """
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        host,
        "--server.port",
        str(int(port)),
        "--server.headless",
        "true",
        "--server.enableXsrfProtection",
        "true",
        "--server.enableCORS",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]


@contextlib.contextmanager
def serve(
    db: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    log: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
) -> Iterator[str]:
    """Start ``streamlit run app.py`` for workspace ``db``; yield its URL; stop it on exit.

    Raises
    ------
    RuntimeError
        The server did not answer its health check within ``timeout`` seconds
        (the message carries the end of its log).
    """
    port = port or free_port(host)
    cmd = streamlit_command(host, port)
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {}), "AUDIT_DB": str(Path(db).resolve())},
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=APP.parent,
    )
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not come up on {url} within {timeout:.0f}s{_tail(log)}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if log:
            out.close()  # type: ignore[union-attr]


def _tail(log: str | Path | None) -> str:
    if not log or not Path(log).exists():
        return ""
    return "; log:\n" + Path(log).read_text(errors="replace")[-2000:]
