"""A real single-node Slurm cluster (Debian's slurm-wlm + munge) for the tests, started in about a second.

`ensure_slurm()` installs the packages with apt-get where they are missing (as root: CI runs as root
with Debian's registry reachable); `SlurmCluster(root).start()` starts munged, slurmctld and slurmd
on localhost with every file under `root` (the cluster is found through `SLURM_CONF`, nothing is
written to /etc), waits until `sinfo` says the node is idle, and `stop()` ends the three daemons by
their pid files. Two partitions share the node: `batch` (the default) and `high` (a higher
PriorityTier; with PreemptType=preempt/partition_prio and PreemptMode=REQUEUE its jobs preempt
batch's by requeueing them). `cred_expire=5` shortens a requeued task's wait before it may start
again (Reason=BeginTime) from about 120 s to about 20 s.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sacct", "scontrol", "scancel", "sinfo")
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_slurm() -> str | None:
    """Install Slurm and munge where they are missing; None when they are there, else why not."""
    if not _missing():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and this machine has no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # The packages' maintainer scripts start their services; a policy-rc.d that answers 101 stops that
    # (the tests start the daemons themselves, under a temp dir). An existing one is left as it was.
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        log = []
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            log.append(proc.stdout[-2000:] + proc.stderr[-2000:])
            if proc.returncode != 0:
                return f"installing Slurm failed ({' '.join(cmd)}: status {proc.returncode}): {log[-1][-600:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"installing Slurm failed: {exc}"
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    missing = _missing()
    return f"Slurm installed, but {', '.join(missing)} are still missing" if missing else None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, every file under `root`."""

    def __init__(self, root: Path, cpus: int = 4):
        self.root, self.cpus = Path(root), cpus
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.jobcomp = self.root / "log" / "jobcomp.txt"
        self.pidfiles: list[Path] = []

    # ---- set-up ----------------------------------------------------------------------------------
    def _munge(self) -> None:
        run = self.root / "munge"
        # munged checks that the socket's directory and every parent can be entered by all (0755: so
        # `root` must lie in a world-traversable path, e.g. a mkdtemp under /tmp), and that its key is
        # private (0400 in a 0700 directory).
        for d in (self.root, run):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        keydir = run / "key"
        keydir.mkdir(mode=0o700, exist_ok=True)
        key = keydir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = run / "munge.socket"
        pid = run / "munged.pid"
        proc = subprocess.run([_sbin("munged"), f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={pid}", f"--log-file={run / 'munged.log'}",
                               f"--seed-file={run / 'seed'}"], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"munged did not start ({proc.returncode}): {proc.stderr.strip()}")
        self.pidfiles.append(pid)

    def _write_conf(self) -> None:
        for d in ("etc", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ctld_port, d_port = _free_ports(2)
        r = self.root
        lines = [
            "ClusterName=enginetest", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={d_port}",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "CredType=cred/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
            "JobRequeue=1", "MinJobAge=600", "KillWait=30", "MailProg=/bin/true", "ReturnToService=2",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={self.jobcomp}",  # then `sacct -c` lists every attempt
            "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
            # more CPUs than the machine has (the tests' tasks mostly wait): slurmd takes the configured count
            *(["SlurmdParameters=config_overrides"] if self.cpus > (os.cpu_count() or 1) else []),
            f"NodeName=localhost CPUs={self.cpus} RealMemory=20000 State=UNKNOWN",
            "PartitionName=batch Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1",
            "PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 120) -> SlurmCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self._munge()
        self._write_conf()
        self.pidfiles += [self.root / "run" / "slurmctld.pid", self.root / "run" / "slurmd.pid"]
        subprocess.run([_sbin("slurmctld")], env=self.env, check=True, capture_output=True, timeout=60)
        subprocess.run([_sbin("slurmd"), "-N", "localhost"], env=self.env, check=True, capture_output=True,
                       timeout=60)
        deadline = time.monotonic() + timeout
        while True:
            state = self.cmd("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False).stdout.split()
            if state and all(s == "idle" for s in state):
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"the Slurm node did not become idle in {timeout:.0f} s (sinfo: {state}); "
                                     f"{self.logs()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30) -> None:
        """End slurmd, slurmctld and munged by their pid files (started by us, nothing else is touched)."""
        pids = []
        for pf in reversed(self.pidfiles):
            try:
                pid = int(pf.read_text().split()[0])
                os.kill(pid, 15)
                pids.append(pid)
            except (OSError, ValueError, IndexError):
                pass
        deadline = time.monotonic() + timeout
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass

    # ---- use -------------------------------------------------------------------------------------
    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def squeue(self, job: str) -> dict[str, str]:
        """Task id ("123_4") -> state of every task of `job` that Slurm still lists as pending or running."""
        out = self.cmd("squeue", "-h", "-r", "-j", job, "-o", "%i %T", check=False).stdout
        return dict(line.split()[:2] for line in out.splitlines() if line.strip())

    def attempts(self, job: str) -> list[dict]:
        """Every ended attempt of every task of `job`, from the job-completion log (`sacct -c`), in order."""
        if not self.jobcomp.exists():
            return []
        out = []
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobId") and self._array_job(fields) == job:
                out.append(fields)
        return out

    def sacct(self) -> list[tuple[str, str, str]]:
        """`sacct -c` (it reads the same job-completion log): (job id, state, exit code) of every attempt. Its
        22.05 text has no array ids (and warns about their fields), hence `attempts` for those."""
        out = self.cmd("sacct", "-c", "-X", "-n", "--parsable2", "-o", "JobID,State,ExitCode", check=False).stdout
        return [tuple(line.split("|")[:3]) for line in out.splitlines() if line.count("|") >= 2]

    @staticmethod
    def _array_job(fields: dict) -> str:
        return fields.get("ArrayJobId") or fields.get("JobId", "")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            if p.exists():
                parts.append(f"--- {name}:\n" + p.read_text()[-3000:])
        return "\n".join(parts)
