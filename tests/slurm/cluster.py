"""A real one-node Slurm cluster on loopback for the tests: munged, slurmctld and slurmd, all as
root, with every file (config, state, spool, logs, munge key and socket) under one private
directory. Nothing in /etc is read or written, so it coexists with a system Slurm or munge.

Clients reach it through ``SlurmCluster.env`` (``SLURM_CONF`` points at the private config);
``sbatch`` exports that environment into jobs, so ``srun`` and ``scontrol`` inside a job talk to
the same cluster. There is no slurmdbd: job states come from ``scontrol show job``, which keeps
finished jobs for ``MinJobAge`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PARTITION = "test"
# Finished jobs stay visible to `scontrol show job` this long; with no accounting daemon this is
# the only record of a job's final state.
MIN_JOB_AGE_S = 300
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
DAEMONS = ("munged", "slurmctld", "slurmd")
# Debian installs the daemons in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def slurm_available() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    missing = [b for b in (*CLIENTS, *DAEMONS) if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        return f"Slurm/munge binaries not found: {', '.join(missing)} (apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root (SlurmUser=root); not running as root"
    return None


class SlurmError(RuntimeError):
    pass


@dataclass
class SlurmCluster:
    root: Path
    node: str
    env: dict[str, str]
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(
        self, args: Sequence[str], check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (``["sbatch", ...]``) against this cluster."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sbatch(self, args: Sequence[str], cwd: Path | None = None) -> str:
        """Submit a job and return its id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed: {proc.stderr}{proc.stdout}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (values containing spaces are kept whole)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        info: dict[str, str] = {}
        key = None
        for token in out.split():
            name, sep, value = token.partition("=")
            if sep and re.fullmatch(r"[A-Za-z_:/]+", name):
                key = name
                info[key] = value
            elif key is not None:
                info[key] += " " + token
        return info

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def restarts(self, job_id: str) -> int:
        """How many times Slurm requeued the job (``Restarts=`` of ``scontrol show job``)."""
        return int(self.job(job_id)["Restarts"])

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float = 60) -> str:
        wanted = frozenset(states)
        state = ""

        def reached() -> bool:
            nonlocal state
            state = self.state(job_id)
            return state in wanted

        self.wait_for(reached, timeout, lambda: f"job {job_id} in {sorted(wanted)} (is {state})")
        return state

    def wait_job(self, job_id: str, timeout: float = 60) -> str:
        """Wait for the job to end; return its final state (COMPLETED, FAILED, CANCELLED, ...)."""
        return self.wait_state(job_id, FINAL_STATES, timeout)

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float, what: str | Callable[[], str]
    ) -> None:
        """Poll ``predicate``; on timeout raise with the daemons' logs, which say why."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                desc = what() if callable(what) else what
                raise SlurmError(
                    f"timed out after {timeout:.0f}s waiting for {desc}\n" + self.logs()
                )
            time.sleep(0.2)

    def logs(self, lines: int = 30) -> str:
        parts = []
        exited = {n: p.returncode for n, p in self._procs.items() if p.poll() is not None}
        for path in sorted((self.root / "log").iterdir()):
            # A daemon's stderr repeats its log file, except what it says before opening it.
            if path.suffix == ".stderr" and path.stem not in exited:
                continue
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        parts += [f"--- {name} exited with {code}" for name, code in exited.items()]
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, and kill anything the cluster left behind."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", f"--partition={PARTITION}"], check=False, timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                proc = self.run(["squeue", "--noheader"], check=False, timeout=10)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # slurmstepd outlives slurmd by design (steps survive a slurmd restart), and job tasks
        # may ignore signals. Everything the cluster started inherited our SLURM_CONF, and so did
        # any client the tests started with self.env: none of them is of use without the cluster.
        marker = f"SLURM_CONF={self.conf}"
        for pid in _pids_with_env(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._procs.clear()
        deadline = time.monotonic() + 10
        while (left := _pids_with_env(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            raise SlurmError(f"processes of the test cluster outlived SIGKILL: {left}")


def start_cluster(workdir: Path, timeout: float = 30) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``workdir``; return once the node is idle."""
    reason = slurm_available()
    if reason:
        raise SlurmError(reason)
    root = workdir.resolve()
    for sub in ("munge", "log", "state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if len(str(root / "munge" / "munge.socket")) > 100:
        raise SlurmError(f"{root} is too long a path for a unix socket; use a shorter workdir")
    # A private key instead of /etc/munge/munge.key: munged insists that its key be owned by the
    # user it runs as, and Debian's key belongs to the munge user, not root. One munged serves
    # the whole one-node cluster, so no other host needs to share the key.
    key = root / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

    node = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = _free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, _node_hardware(), ctld_port, slurmd_port))
    # Read from slurm.conf's directory. This machine (cgroup v1) starts and runs jobs without it;
    # on a cgroup v2 host without systemd, slurmd's cgroup/v2 plugin would otherwise ask systemd
    # for a scope.
    (root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    # The tests may themselves run inside a Slurm job, whose variables would steer the clients
    # (and the jobs they submit) to the outer cluster's job.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = SEARCH_PATH
    cluster = SlurmCluster(root=root, node=node, env=env)
    try:
        munge_dir = root / "munge"
        cluster._procs["munged"] = _spawn(
            [
                "munged",
                "--foreground",
                # munged wants every directory above its socket open to all users; pytest's
                # temp directories are 0700. --force turns that check into a warning.
                "--force",
                f"--socket={munge_dir / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            env,
            # In the foreground munged logs to stderr only.
            root / "log" / "munged.log",
        )
        cluster.wait_for(lambda: (munge_dir / "munge.socket").exists(), 10, "munged's socket")
        # -D keeps each daemon a child of this process, so stop() can wait for it; -c drops
        # jobs left in the state directory by an earlier cluster in the same workdir.
        cluster._procs["slurmctld"] = _spawn(
            ["slurmctld", "-D", "-c"], env, root / "log" / "slurmctld.stderr"
        )
        cluster._procs["slurmd"] = _spawn(
            ["slurmd", "-D", "-N", node], env, root / "log" / "slurmd.stderr"
        )
        cluster.wait_for(
            lambda: _node_idle(cluster),
            timeout,
            lambda: f"node {node} to be idle; sinfo: {_node_state(cluster)}",
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _slurm_conf(root: Path, node: str, hardware: str, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=bigscale-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job is held (Reason=BeginTime, EligibleTime =
# requeue + cred_expire + 1 s) before it may start again: 120 s by default (measured: 121 s),
# and 5 s is the least Slurm accepts. Credentials only have to outlive a local step launch.
AuthInfo=socket={root / "munge" / "munge.socket"},cred_expire=5
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
# No cgroup delegation without systemd: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
# Cores only: with memory as a resource a job without --mem would hold the whole node.
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# When a requeued job's BeginTime passes no event triggers a scheduling pass: it waits for the
# main loop (every 60 s) or backfill (every 30 s). Measured here: 23 s to restart by default,
# 6 s with the main loop every second. Submissions and job ends still schedule at once.
SchedulerParameters=sched_interval=1,batch_sched_delay=0
JobRequeue=1
ReturnToService=2
KillWait=2
MinJobAge={MIN_JOB_AGE_S}
InactiveLimit=0
Waittime=0
MessageTimeout=10
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} {hardware} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=UNLIMITED State=UP
"""


def _node_hardware() -> str:
    """The node's CPUs, sockets, cores and RealMemory exactly as slurmd will detect them: a node
    configured with more than slurmd finds is drained, one with less wastes the machine."""
    out = subprocess.run(
        ["slurmd", "-C"], env={"PATH": SEARCH_PATH}, capture_output=True, text=True, check=True
    ).stdout
    first = out.splitlines()[0].split()
    return " ".join(t for t in first if not t.startswith(("NodeName=", "UpTime=")))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _spawn(args: list[str], env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    with out.open("ab") as f:
        return subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT
        )


def _node_idle(cluster: SlurmCluster) -> bool:
    for name, proc in cluster._procs.items():
        if proc.poll() is not None:
            raise SlurmError(f"{name} exited with {proc.returncode}\n{cluster.logs()}")
    return _node_state(cluster) == f"{cluster.node} idle"


def _node_state(cluster: SlurmCluster) -> str:
    proc = cluster.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], check=False)
    return " ".join((proc.stdout + proc.stderr).split())


def _pids_with_env(entry: str) -> list[int]:
    needle = entry.encode() + b"\0"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if environ.startswith(needle) or b"\0" + needle in environ:
            pids.append(int(proc.name))
    return pids
