"""A throw-away one-node SLURM cluster for the tests (issue 14): ``munged`` + ``slurmctld`` + ``slurmd``.

Everything lives under one temporary directory: the munge key, socket, seed, log and pid files, the generated
``slurm.conf`` (found by the SLURM tools through ``SLURM_CONF``), the controller state, the slurmd spool, the
daemons' logs and a job-completion log. No system file is read or written except the binaries. The daemons
run in the foreground as children of this process and are stopped by their PIDs on exit (also when the body
raised); job steps (``slurmstepd`` and whatever a job started) are cancelled first, then any that survived are
killed by PID too.

Usage::

    ensure_slurm_installed()          # apt-get install -y slurm-wlm munge when missing (raises SlurmUnavailable)
    with one_node_slurm(tmpdir) as c:  # c.env: {"SLURM_CONF": ...}; c.partition, c.node, c.logs
        subprocess.run(["sbatch", ...], env={**os.environ, **c.env})
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel")
PACKAGES = ("slurm-wlm", "munge")
_MARK = "SPK_TEST_SLURM_CLUSTER"  # set in the daemons' environment only: finds their job steps at teardown
_NO_NETWORK = ("Could not resolve", "Temporary failure resolving", "Failed to fetch", "Network is unreachable",
               "Unable to connect", "Connection failed", "Could not connect", "No route to host",
               "Connection timed out", "Cannot initiate the connection")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed here; ``reason`` is "no-root", "no-apt", "no-network" or "apt-failed"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)


def missing_binaries() -> List[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_slurm_installed(timeout: float = 900) -> float:
    """Install Debian's ``slurm-wlm`` and ``munge`` with apt-get when a binary is missing (as CI does).

    Returns the seconds spent installing (0 when already installed).

    Raises
    ------
    SlurmUnavailable
        Not root, no apt-get, no network, or apt-get failed (the message carries apt's own error).
    """
    if not missing_binaries():
        return 0.0
    t0 = time.perf_counter()
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM binaries {missing_binaries()} are missing and installing "
                               f"{' '.join(PACKAGES)} needs root (euid {os.geteuid()})", "no-root")
    apt = shutil.which("apt-get")
    if apt is None:
        raise SlurmUnavailable(f"SLURM binaries {missing_binaries()} are missing and there is no apt-get", "no-apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get on this machine: wait for it instead of failing

    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([apt, *lock, *args], env=env, capture_output=True, text=True, timeout=timeout)

    install = ("install", "-y", "-q", *PACKAGES)
    p = sh(*install)
    log = p.stdout + p.stderr
    if p.returncode != 0:  # a fresh machine has no package lists yet
        u = sh("update", "-q")
        p = sh(*install)
        log = f"$ apt-get update\n{u.stdout}{u.stderr}\n$ apt-get {' '.join(install)}\n{p.stdout}{p.stderr}"
    if p.returncode != 0 or missing_binaries():
        tail = "\n".join(log.strip().splitlines()[-15:])
        reason = "no-network" if any(s in log for s in _NO_NETWORK) else "apt-failed"
        raise SlurmUnavailable(f"apt-get install -y {' '.join(PACKAGES)} failed (rc {p.returncode}, "
                               f"still missing {missing_binaries()}):\n{tail}", reason)
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<{e}>"


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


def _children_map() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(roots: List[int]) -> List[int]:
    kids, out, todo = _children_map(), [], list(roots)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_pids(pids: List[int], grace: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@dataclasses.dataclass
class SlurmCluster:
    root: Path
    env: Dict[str, str]       # what a SLURM client (sbatch, dask-jobqueue) needs: SLURM_CONF
    partition: str
    node: str
    cpus: int
    memory_mb: int
    logs: Dict[str, Path]     # munged, slurmctld, slurmd, jobcomp
    procs: Dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)
    up_seconds: float = 0.0

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> str:
        """Run a SLURM client command against this cluster; returns stdout."""
        p = subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc {p.returncode}): {p.stderr.strip()}\n{self.log_tails()}")
        return p.stdout

    def log_tails(self, n: int = 25) -> str:
        return "\n".join(f"--- {name}: {path} (last {n} lines)\n{_tail(path, n)}" for name, path in self.logs.items())

    def dead_daemons(self) -> List[str]:
        return [f"{k} (exit {p.returncode})" for k, p in self.procs.items() if p.poll() is not None]


def _write_conf(c: SlurmCluster, d: Path, munge_socket: Path, ctld_port: int, slurmd_port: int) -> Path:
    conf = d / "slurm.conf"
    conf.write_text(f"""\
# generated by test/slurm_cluster.py: a one-node cluster under {d}
ClusterName=spktest
SlurmctldHost={c.node}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={c.logs["slurmctld"]}
SlurmdLogFile={c.logs["slurmd"]}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={c.logs["jobcomp"]}
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=3
MinJobAge=30
PlugStackConfig={d / "plugstack.conf"}
NodeName={c.node} NodeAddr=127.0.0.1 CPUs={c.cpus} RealMemory={c.memory_mb} State=UNKNOWN
PartitionName={c.partition} Nodes={c.node} Default=YES MaxTime=INFINITE State=UP
""")
    (d / "plugstack.conf").write_text("")  # no system SPANK plugins
    return conf


@contextlib.contextmanager
def one_node_slurm(tmpdir, partition: str = "debug", timeout: float = 300) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd under ``tmpdir``; yield a :class:`SlurmCluster`; stop them by PID.

    Raises
    ------
    RuntimeError
        A daemon exited or the node was not idle within ``timeout`` s (with the daemons' log tails).
    """
    t0 = time.perf_counter()
    d = Path(tmpdir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir(exist_ok=True)
        os.chmod(d / sub, 0o700)
    # unix socket paths are limited to 108 bytes: fall back to a short private directory
    sockdir = d / "munge"
    short = None
    if len(str(sockdir / "munge.socket")) > 100:
        short = Path(tempfile.mkdtemp(prefix="spkmunge"))
        sockdir = short
    munge_socket = sockdir / "munge.socket"
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = max(256, min(int(_mem_total_mb() * 0.8), _mem_total_mb() - 512))
    logs = {"munged": d / "munge" / "munged.log", "slurmctld": d / "slurmctld.log", "slurmd": d / "slurmd.log",
            "jobcomp": d / "jobcomp.log"}
    c = SlurmCluster(root=d, env={}, partition=partition, node=node, cpus=cpus, memory_mb=memory_mb, logs=logs)
    conf = _write_conf(c, d, munge_socket, _free_port(), _free_port())
    c.env = {"SLURM_CONF": str(conf)}
    denv = {**os.environ, **c.env, _MARK: str(d)}
    denv.pop("SLURM_JOB_ID", None)
    key = d / "munge" / "munge.key"
    needle = f"{_MARK}={d}".encode()
    try:
        subprocess.run([_which("mungekey"), "--create", "--force", f"--keyfile={key}"], check=True,
                       capture_output=True, text=True)
        os.chmod(key, 0o600)

        def start(name: str, cmd: List[str]) -> None:
            out = open(d / f"{name}.stdout", "wb")
            c.procs[name] = subprocess.Popen(cmd, env=denv, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=d, start_new_session=True)
            out.close()
            logs.setdefault(f"{name} stdout", d / f"{name}.stdout")

        start("munged", [_which("munged"), "--foreground", "--force", f"--socket={munge_socket}",
                         f"--key-file={key}", f"--log-file={logs['munged']}", f"--pid-file={d / 'munge' / 'munged.pid'}",
                         f"--seed-file={d / 'munge' / 'munged.seed'}", "--num-threads=2"])
        _wait(c, lambda: munge_socket.exists(), timeout, "munged socket")
        start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)])
        start("slurmd", [_which("slurmd"), "-D", "-N", node, "-f", str(conf)])

        def idle() -> bool:
            p = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], env={**os.environ, **c.env},
                               capture_output=True, text=True, timeout=120)
            return p.returncode == 0 and p.stdout.strip() == "idle"

        _wait(c, idle, timeout, f"node {node} idle in sinfo")
        c.up_seconds = time.perf_counter() - t0
        yield c
    finally:
        _stop(c, needle)
        if short is not None:
            shutil.rmtree(short, ignore_errors=True)


def _wait(c: SlurmCluster, ok, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        dead = c.dead_daemons()
        if dead:
            raise RuntimeError(f"SLURM test cluster: {', '.join(dead)} exited while waiting for {what}\n"
                               f"{c.log_tails()}")
        try:
            if ok():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"SLURM test cluster: no {what} after {timeout:.0f} s\n{c.log_tails()}")
        time.sleep(0.2)


def _stop(c: SlurmCluster, needle: bytes) -> None:
    """Cancel the jobs, then stop job steps, slurmd, slurmctld and munged, each by PID."""
    env = {**os.environ, **c.env}
    if all(k in c.procs and c.procs[k].poll() is None for k in ("slurmctld", "slurmd")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", "--full", "--partition", c.partition], env=env, capture_output=True,
                           timeout=120)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                p = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=120)
                if p.returncode != 0 or not p.stdout.strip():
                    break
                time.sleep(0.3)
    # job steps: slurmstepd processes carry the daemons' marker; their descendants are the jobs' processes
    daemons = {p.pid for p in c.procs.values()}
    steps = [int(x) for x in os.listdir("/proc") if x.isdigit() and int(x) not in daemons and int(x) != os.getpid()
             and _environ_has(int(x), needle)]
    leftovers = [p for p in _descendants(steps) if p != os.getpid()]
    for name in ("slurmd", "slurmctld", "munged"):
        p = c.procs.get(name)
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    if leftovers:
        _kill_pids(leftovers)
