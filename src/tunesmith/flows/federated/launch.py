"""Starting Flower's own processes: a SuperLink, SuperNodes, and ``flwr run`` for the app.

Nothing here moves a tensor or schedules a round: Flower's Deployment Engine does (the
SuperLink serves the Fleet and Control APIs; each SuperNode runs the ClientApp for its
messages). This module writes the app's ``pyproject.toml`` and the Flower CLI's
``config.toml`` into the run directory, starts the processes, and always stops them.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tunesmith.errors import TunesmithError

# the Flower app's settings; the server reads them as context.run_config
APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tunesmith-federated"
version = "1.0.0"
description = "tunesmith federated fine-tuning"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "tunesmith"

[tool.flwr.app.components]
serverapp = "tunesmith.flows.federated.{module}:server_app"
clientapp = "tunesmith.flows.federated.{module}:client_app"

[tool.flwr.app.config]
{config}
"""

CONNECTION_TOML = """[superlink]
default = "tunesmith"

[superlink.tunesmith]
address = "{address}"
{security}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(folder: Path, run_config: dict[str, object], *, secure: bool = False) -> Path:
    """The Flower app directory ``flwr run`` packages: only a pyproject.toml, pointing at the
    apps inside the installed tunesmith package (``secure``: the SecAgg+ pair). SuperNodes
    run the ClientApp the server's app names, so the server decides for every client."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in run_config.items())
    (folder / "pyproject.toml").write_text(
        APP_TOML.format(config=lines, module="secure" if secure else "apps"), encoding="utf-8")
    return folder


def write_connection(flwr_home: Path, address: str, *, root_certificates: Path | None = None
                     ) -> None:
    """``$FLWR_HOME/config.toml``: where ``flwr run`` finds the SuperLink (Flower >= 1.2x
    reads the connection from here, not from the app's pyproject)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (f'root-certificates = "{root_certificates}"' if root_certificates
                else "insecure = true")
    (flwr_home / "config.toml").write_text(
        CONNECTION_TOML.format(address=address, security=security), encoding="utf-8")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of Flower's processes: this Python's scripts first on PATH (the
    SuperLink starts ``flower-superexec`` by name), the Flower home in the run directory."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    # the ClientApp process polls for its message; Flower's 1 s default adds a second a round
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    return env


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Processes:
    """Child processes, each in its own process group, stopped together (SIGTERM, then
    SIGKILL after ``grace`` seconds): Flower's SuperLink and SuperNode start helpers of their
    own (SuperExec, ServerApp, ClientApp), which must go with them."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.children: list[subprocess.Popen[bytes]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], *, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.children.append(proc)
        return proc

    def stop(self, grace: float = 5.0) -> None:
        for proc in self.children:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.children:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            # the group too: a ClientApp may outlive its SuperNode
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _die_with_parent() -> None:
    """In the child, before it runs: Linux sends it SIGTERM when this process dies, even by
    SIGKILL, which no ``finally`` sees. Without it, a killed ``federated simulate`` would leave
    its SuperLink and SuperNodes running (each is in a session of its own), and a restarted
    server would race the orphans. Elsewhere (no prctl) the ``finally`` cleanup is all."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextmanager
def processes(env: dict[str, str], log_dir: Path) -> Iterator[Processes]:
    """Children that are stopped however the block ends (error, Ctrl-C, SIGTERM)."""
    procs = Processes(env, log_dir)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield procs
    finally:
        procs.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def superlink_args(port: int, *, host: str = "127.0.0.1", certfile: Path | None = None,
                   keyfile: Path | None = None, ca_certfile: Path | None = None) -> list[str]:
    # no network at run time: the app's dependencies are tunesmith's, already installed
    args = [_bin("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if certfile and keyfile:
        args += ["--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile)]
        if ca_certfile:
            args += ["--ssl-ca-certfile", str(ca_certfile)]
    else:
        args.append("--insecure")
    return args


def supernode_args(superlink: str, node_config: dict[str, object], *, runtime_port: int,
                   root_certificates: Path | None = None, max_retries: int | None = None,
                   max_wait_time: float | None = None) -> list[str]:
    config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
    args = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port),
            "--node-config", config]
    args += ["--root-certificates", str(root_certificates)] if root_certificates \
        else ["--insecure"]
    if max_retries is not None:
        args += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        args += ["--max-wait-time", str(max_wait_time)]
    return args


def wait_for_port(host: str, port: int, *, timeout: float, proc: subprocess.Popen[bytes],
                  log: Path) -> None:
    """Until the SuperLink accepts connections (or it died, or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TunesmithError(f"the Flower SuperLink exited ({proc.returncode}); see {log}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TunesmithError(f"the Flower SuperLink did not open {host}:{port} within "
                         f"{timeout:.0f} s; see {log}")


def flwr_run(app_dir: Path, env: dict[str, str], log: Path) -> int:
    """``flwr run APP tunesmith --stream``: submit the app and follow it to the end."""
    args = [_bin("flwr"), "run", str(app_dir), "tunesmith", "--stream"]
    with log.open("ab") as out:
        out.write(f"$ {shlex.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
