"""`steerserve serve` as a child process on a free loopback port.

Used wherever a private server is needed: `steerserve run-batch`, the benchmarks and the tests.
The child gets its own process group, so stopping it also stops vLLM's engine processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    pass


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The options of a subcommand that runs against a server (`eval`, `dashboards`,
    `bench-steering`): a running one, or a private one started from the arguments it does not know
    (parse them with parse_server_args)."""
    group = parser.add_argument_group(
        "server", "a running server (--base-url), else a private one: `steerserve serve` with every argument not "
                  "listed here (MODEL, --sae, --sae-layers, vLLM options)")
    group.add_argument("--base-url", metavar="URL",
                       help="use a running server instead of starting one (default: none, start a private one)")
    group.add_argument("--api-key", metavar="KEY",
                       help="the key the requests send; a private server is started with it (default: "
                            "$VLLM_API_KEY, else none)")
    group.add_argument("--server-log", type=Path, default=None, metavar="FILE",
                       help="keep the private server's log here (default: none, a temporary file)")


def parse_server_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """A subcommand's own options, and the arguments of the `steerserve serve` it would start:
    every argument it does not know, and its --api-key (which the requests send: api_key_of)."""
    args, serve_args = parser.parse_known_args(argv)
    if args.api_key is not None:
        serve_args = [*serve_args, "--api-key", args.api_key]
    return args, serve_args


def require_server(parser: argparse.ArgumentParser, base_url: str | None, serve_args: list[str]) -> None:
    """Exit with usage when there is neither a running server nor a model to start one with."""
    if base_url is None and not serve_args:
        parser.error("give the MODEL and its serve options (or --base-url)")


def has_option(argv: list[str], name: str) -> bool:
    """Whether serve arguments set `name` (as `--name value` or `--name=value`)."""
    return any(a == name or a.startswith(name + "=") for a in argv)


def api_key_of(argv: list[str]) -> str | None:
    """The API key serve arguments give the server (or VLLM_API_KEY): what its clients send."""
    for i, a in enumerate(argv):
        if a == "--api-key" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--api-key="):
            return a.split("=", 1)[1]
    return os.environ.get("VLLM_API_KEY") or None


@contextmanager
def server_client(base_url: str | None, serve_args: list[str], server_log: str | Path | None,
                  timeout: float) -> Iterator[httpx.Client]:
    """A client of the running server at `base_url`, or of a private one started from
    `serve_args` (its --data-dir in a temporary directory unless given), stopped on exit; the
    client sends the key the serve arguments give. ServerStartError if the private one fails."""
    with tempfile.TemporaryDirectory(prefix="steerserve-") as tmp:
        server = None
        if base_url is None:
            extra = [] if has_option(serve_args, "--data-dir") else ["--data-dir", os.path.join(tmp, "data")]
            server = ServeProcess(serve_args + extra, server_log or Path(tmp) / "server.log")
        try:
            if server is not None:
                server.wait_ready(1800)
                base_url = server.base_url
            key = api_key_of(serve_args)
            # vLLM's HTTP server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s), httpx
            # reuses one idle up to its keepalive_expiry (also 5 s): a request sent on one the server is
            # closing fails with "Server disconnected without sending a response". Seen in
            # bench-steering after the language judge's seconds-long first load; 2 s stays clear of it.
            with httpx.Client(base_url=base_url, timeout=timeout, limits=httpx.Limits(keepalive_expiry=2.0),
                              headers={"Authorization": f"Bearer {key}"} if key else {}) as http:
                yield http
        finally:
            if server is not None:
                server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, serve_args: list[str], log_path: Path, *, env: dict | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        command = [sys.executable, "-m", "steerserve", "serve", *serve_args,
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Seconds from start until /health answered; ServerStartError with the log tail if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ServerStartError(f"the server was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the engine is left
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()
