"""Run `python -m service` as a child process and wait until it is ready: for tests,
benchmarks and scripts that need a real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(
        self,
        repository: Path,
        *args: str,
        env: dict[str, str] | None = None,
        module: str = "service",  # run as `python -m <module>`, taking the service's arguments
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Its own gRPC port too: servers started side by side must not share the default.
        given = (env or {}).get("BNSERVE_GRPC_PORT")
        if "--grpc-port" in args:
            given = args[args.index("--grpc-port") + 1]
        self.grpc_port = int(given) if given is not None else free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.log_path = Path(tempfile.gettempdir()) / f"bnserve-{self.port}.log"
        self.log = open(self.log_path, "w+b")  # noqa: SIM115 - closed in stop()
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        full_env = dict(os.environ, PYTHONPATH=path, **(env or {}))
        command = [
            sys.executable, "-m", module, "--repository", str(repository),
            "--host", "127.0.0.1", "--port", str(self.port),
            *([] if given is not None else ["--grpc-port", str(self.grpc_port)]), *args,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, env=full_env, stdout=self.log, stderr=self.log)

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_ready(self, timeout: float = 60.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.output()}")
            if self.status("/v2/health/ready") == 200:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"service not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self.log.close()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
