"""A real one-node SLURM cluster for the launch tests: munged, slurmctld and
slurmd from Debian's slurm-wlm, run in the foreground with their config,
state, spool, sockets and logs under one temp directory and their own ports.

    with LocalSlurm(tmp_dir) as cluster:
        job = cluster.wait_for(job_id, ("COMPLETED",))

Nothing outside the temp directory is touched; every daemon started is
stopped by PID when the context exits, also on error.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Dict, List, Optional, Sequence

DAEMONS = ("munged", "slurmctld", "slurmd")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE")


def missing_reason() -> Optional[str]:
    """Why a local cluster cannot start here, or None."""
    absent = [d for d in DAEMONS + ("sbatch", "scontrol", "scancel") if not shutil.which(d)]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} not on PATH); .ci/install-slurm installs "
                "the Debian packages slurm-wlm and munge (needs root and apt)")
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as SlurmUser=root; these tests need root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """One node (this host, CPUs=2), one partition, started in seconds."""

    def __init__(self, root: str, cpus: int = 2, start_timeout_s: float = 30.0):
        self.root = os.path.abspath(root)
        self.cpus = cpus
        self.start_timeout_s = start_timeout_s
        self.procs: List[subprocess.Popen] = []
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.startup_s = 0.0

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        t0 = time.monotonic()
        try:
            self._write_files()
            sock = self._path("munge.socket")
            self._spawn(["munged", "-F", "-f", f"--key-file={self._path('munge.key')}", f"--socket={sock}",
                         f"--pid-file={self._path('munged.pid')}", f"--seed-file={self._path('munged.seed')}",
                         f"--log-file={self._path('munged.log')}"], "munged")
            self._wait(lambda: os.path.exists(sock), "munged socket")
            self._spawn(["slurmctld", "-D", "-i", "-f", self.conf], "slurmctld")
            self._spawn(["slurmd", "-D", "-f", self.conf], "slurmd")
            self._wait(lambda: "idle" in self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout, "an idle node")
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Cancel our jobs, then stop each daemon we started, by PID."""
        if self.procs and self.procs[-1].poll() is None:
            self.run(["scancel", "--user", "root"], check=False)
            time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()

    # -- queries -------------------------------------------------------------
    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` fields, e.g. JobState, ExitCode, Restarts."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_for(self, job_id: str, states: Sequence[str], timeout_s: float = 120.0) -> Dict[str, str]:
        """Poll until the job is in one of `states` (or finished); raise with the logs on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states or state in FINISHED:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f}s; slurmd log:\n"
                                   + self.tail("slurmd.log"))
            time.sleep(0.25)

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            with open(self._path(name)) as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"({e})"

    # -- internals -------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _spawn(self, cmd: List[str], name: str) -> None:
        log = open(self._path(f"{name}.stdout"), "wb")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        log.close()

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"no {what} after {self.start_timeout_s:.0f}s"
                raise RuntimeError(f"local SLURM did not start: {why}; slurmctld log:\n" + self.tail("slurmctld.log")
                                   + "\nslurmd log:\n" + self.tail("slurmd.log"))
            time.sleep(0.1)

    def _write_files(self) -> None:
        for sub in ("state", "spool"):
            os.makedirs(self._path(sub), exist_ok=True)
        key = self._path("munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        host = socket.gethostname().split(".")[0]
        p = self._path
        lines = [
            "ClusterName=megatronext", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            # cred_expire also sets how long a requeued job waits before it starts again (default 120 s).
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={p('munge.socket')},cred_expire=10",
            f"StateSaveLocation={p('state')}", f"SlurmdSpoolDir={p('spool')}",
            f"SlurmctldPidFile={p('slurmctld.pid')}", f"SlurmdPidFile={p('slurmd.pid')}",
            f"SlurmctldLogFile={p('slurmctld.log')}", f"SlurmdLogFile={p('slurmd.log')}",
            # Plain process tracking: containers here have no writable cgroup tree.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SwitchType=switch/none",
            "MpiDefault=none", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "PlugStackConfig=/dev/null", "KillWait=10", "MinJobAge=3600", "SchedulerParameters=sched_interval=1",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
