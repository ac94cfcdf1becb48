"""Run a BIRD2 daemon inside a network namespace, with every file in a private directory.

Used by the integration tests, the benchmarks and the lab: each BIRD gets its
own config, control socket, pid file and log under a caller-supplied directory,
so several run side by side and none touches the host's /run/bird or /etc/bird.
It is stopped by the PID it was started with, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from flock.testbed.wait import WaitTimeout, wait_until

BIRD = "bird"


@dataclass
class BirdDaemon:
    """A BIRD started in `netns`, with its files in `workdir`."""

    netns: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / "bird.conf"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "bird.ctl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "bird.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, config_text: str | None = None, *, wait: float = 60.0) -> None:
        """Start BIRD in the foreground (so that its PID is ours); waits for the control socket.

        Without `config_text`, the existing config file is used (a restart);
        with none on disk, a minimal one that the agent later replaces.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"BIRD in {self.netns} is already running (pid {self.proc.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if config_text is not None:
            self.config_path.write_text(config_text)
        elif not self.config_path.exists():
            self.config_path.write_text("router id 10.255.255.1;\nprotocol device {}\n")
        self.socket_path.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        try:
            # `ip netns exec` execs BIRD, so Popen's PID is BIRD's own.
            self.proc = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.netns, BIRD, "-f",
                    "-c", str(self.config_path),
                    "-s", str(self.socket_path),
                    "-P", str(self.workdir / "bird.pid"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            log.close()
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"BIRD in {self.netns} exited with {proc.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            return self._answers()

        try:
            wait_until(
                answers,
                timeout=wait,
                what=f"BIRD in {self.netns} to open {self.socket_path}",
                interval=0.02,
            )
        except WaitTimeout:
            self.stop()
            raise

    def _answers(self) -> bool:
        """The control socket accepts a connection (the file appears before listen())."""
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def kill(self) -> None:
        """SIGKILL: a crash, as the agent would see one."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
