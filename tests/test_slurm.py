"""slurm/imagenet.sbatch against a real one-node SLURM cluster (Debian's slurm-wlm and munge, which .ci/run installs):
the three endings a job meets. Skipped, saying why, where the daemons cannot start (not root, not installed)."""
import os
import random
import re
import shutil
import socket
import subprocess
import time

import pytest

import model as M

from conftest import (DDP_COMMON, HERE, assert_state_equal, child_env, free_port, kill_tree, run_script,
                      write_image_folder)

CONF = """ClusterName=resnet-tests
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
SlurmUser=root
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmdSpoolDir={d}/spool
StateSaveLocation={d}/state
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=30
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """A running cluster: its config, and the commands run against it."""

    def __init__(self, folder):
        self.folder, self.env = folder, child_env(SLURM_CONF=str(folder / "slurm.conf"))

    def run(self, *cmd):
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)

    def job(self, job_id):
        """scontrol's fields of a job (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id, ok, what, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            fields = self.job(job_id)
            if ok(fields):
                return fields
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} never {what}: {self.job(job_id)}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd started here with a config of this test's (its own ports and folders), stopped
    at the end with every job and process they started."""
    if os.geteuid() != 0:
        pytest.skip("SLURM's daemons run as root here, and this is not root")
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(b)]
    if missing or not os.path.exists("/etc/munge/munge.key"):
        why = ", ".join(missing) or "no munge key"
        pytest.skip(f"SLURM is not installed ({why}; .ci/run installs slurm-wlm munge)")
    d = tmp_path_factory.mktemp("slurm")
    (d / "spool").mkdir()
    (d / "state").mkdir()
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(CONF.format(host=host, d=d, ctld_port=free_port(), d_port=free_port(),
                                              cpus=os.cpu_count()))
    cluster = Slurm(d)
    daemons = [subprocess.Popen(cmd, env=cluster.env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
               for cmd in (["munged", "-F", "--force", f"--socket={d}/munge.sock", f"--pid-file={d}/munged.pid",
                            f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                           ["slurmctld", "-D", "-i"], ["slurmd", "-D"])]
    try:
        deadline = time.time() + 60
        while cluster.run("sinfo", "-h", "-o", "%t").stdout.strip() != "idle":
            if time.time() > deadline or any(p.poll() is not None for p in daemons):
                pytest.skip(f"SLURM did not start: {cluster.run('sinfo').stderr.strip()[-300:]}")
            time.sleep(0.5)
        yield cluster
    finally:
        cluster.run("scancel", "--user=root")
        deadline = time.time() + 60
        while cluster.run("squeue", "-h").stdout.strip() and time.time() < deadline:
            time.sleep(0.5)
        for p in reversed(daemons):
            kill_tree(p.pid)
            p.wait()


def submit(cluster, tmp_path, out, data, script="slurm/imagenet.sbatch", train_flags=DDP_COMMON):
    """A launch script as README gives it, from the repository root, with the documented small-data switches:
    2 CPU processes (NPROC), the tests' tiny data and flags (TRAIN_FLAGS)."""
    env = dict(cluster.env, NPROC="2", TRAIN_FLAGS=" ".join(map(str, train_flags)), RDZV_PORT=str(free_port()),
               SBATCH_OUTPUT=str(tmp_path / "%j.log"), **({"DATA": str(data), "OUT": str(out)} if data else {}))
    res = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={os.cpu_count()}", script],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    return job, tmp_path / f"{job}.log"


def wait_for_line(log, pattern, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text() if log.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    text = log.read_text()[-3000:] if log.exists() else ""
    raise AssertionError(f"{pattern!r} not in {log} within {timeout}s:\n{text}")


def come_back(cluster, job, restarts):
    """A requeued job: pending again with its restarts counted; an administrator's StartTime=now skips its wait
    (BeginTime), once the node is idle and a new second has begun: slurmd refuses a job whose credential is no newer,
    to the second, than the kill of its previous run ("Job credential revoked")."""
    cluster.wait_job(job, lambda f: f["JobState"] == "PENDING" and f["Restarts"] == str(restarts),
                     "went back to the queue")
    deadline = time.time() + 60
    while cluster.run("sinfo", "-h", "-o", "%t").stdout.strip() != "idle" and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    assert cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0


def ended(cluster, job):
    return cluster.wait_job(job, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), "ended")


def assert_same_run(a, b):
    a, b = M.load_checkpoint(a / "last.pt"), M.load_checkpoint(b / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "epoch", "step", "ema_updates"):
        assert_state_equal(a[key], b[key])


def test_a_job_requeued_at_its_time_limit_then_preempted_ends_as_the_uninterrupted_run(slurm, ddp_reference, inet_data,
                                                                                      tmp_path):
    """The two requeues a job meets, one after the other: the time limit in epoch 1 (SLURM's --signal=B:USR1@N, sent
    here at once as SLURM sends it: USR1 to the batch shell alone; the script stops the ranks and requeues the job
    itself), then preemption in epoch 2 (`scontrol requeue`: SIGTERM to the job, SLURM requeues it). Each time the
    ranks save at a step, the job comes back and continues from that step; it ends bit for bit where the
    uninterrupted 2-process run ended."""
    ref_out, _ = ddp_reference
    job, log = submit(slurm, tmp_path, tmp_path / "run", inet_data)
    for epoch, requeue in ((1, ["scancel", "--batch", "--signal=USR1", job]), (2, ["scontrol", "requeue", job])):
        wait_for_line(log, rf"epoch {epoch}/2 step {random.randint(2, 5)}/12")  # (the stop lands a few steps later)
        assert slurm.run(*requeue).returncode == 0
        come_back(slurm, job, restarts=epoch)
    fields = ended(slurm, job)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "2", (fields, text[-3000:])
    stops = re.findall(r"stopped by SIGTERM at epoch (\d) step (\d+); saved", text)
    assert [e for e, _ in stops] == ["1", "2"], text[-3000:]
    for e, step in stops:
        assert f"resumed from {tmp_path / 'run' / 'last.pt'} at epoch {e} step {step}" in text, text[-3000:]
    assert text.count("the time limit is near") == 1, text[-3000:]
    assert_same_run(ref_out, tmp_path / "run")


def test_scancel_saves_and_ends_the_slurm_job_for_good(slurm, inet_data, tmp_path):
    """scancel: SIGTERM to the job; the ranks save last.pt (loadable, at the step they stopped after), the job ends
    CANCELLED and stays so (no requeue), and nothing of it is left running."""
    job, log = submit(slurm, tmp_path, tmp_path / "run", inet_data)
    wait_for_line(log, rf"epoch 1/2 step {random.randint(2, 5)}/12")  # (the stop lands a few steps later)
    assert slurm.run("scancel", job).returncode == 0
    slurm.wait_job(job, lambda f: f["JobState"] == "CANCELLED", "was cancelled")
    text = wait_for_line(log, r"stopped by SIGTERM at epoch 1 step \d+; saved")
    step = int(re.search(r"stopped by SIGTERM at epoch 1 step (\d+)", text)[1])
    ckpt = M.load_checkpoint(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (0, step)
    deadline = time.time() + 60
    while subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True).returncode == 0:
        assert time.time() < deadline, "the job's processes outlived it"
        time.sleep(0.5)
    time.sleep(2)
    assert slurm.job(job)["JobState"] == "CANCELLED" and slurm.job(job)["Restarts"] == "0"
    assert not slurm.run("squeue", "-h").stdout.strip()


def test_cifar_under_slurm_saves_requeues_itself_at_the_time_limit_and_continues(slurm, tmp_path):
    """slurm/cifar.sbatch's time limit: USR1 to the batch shell, as --signal=B:USR1@N sends it; the trainer saves,
    the job requeues itself, comes back and ends bit for bit as the same run uninterrupted."""
    data = write_image_folder(tmp_path / "d", splits=("train", "test"), per_class=(64, 4), size=32, fmt="PNG")
    flags = ["--dataset", "folder", "--data-dir", data, "--epochs", "2", "--batch-size", "8", "--log-every", "1",
             "--workers", "1", "--arch", "resnet18", "--amp", "off"]
    ref = run_script("cifar.py", *flags, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    job, log = submit(slurm, tmp_path, None, None, "slurm/cifar.sbatch", [*flags, "--out", tmp_path / "run"])
    wait_for_line(log, rf"epoch 1/2 step {random.randint(3, 12)}/24")
    assert slurm.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    come_back(slurm, job, 1)
    fields = ended(slurm, job)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, text[-3000:])
    stopped = re.search(r"stopped by SIGTERM at epoch 1 step (\d+); saved", text)
    assert stopped and f"at epoch 1 step {stopped[1]}" in text.split("resumed from", 1)[-1], text[-3000:]
    a, b = M.load_checkpoint(tmp_path / "ref" / "last.pt"), M.load_checkpoint(tmp_path / "run" / "last.pt")
    for key in ("model", "optimizer", "epoch", "step"):
        assert_state_equal(a[key], b[key])
