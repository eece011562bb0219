"""Tests of imagenet_ddp."""
import copy
import contextlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import model as M
import cifar
import imagenet_ddp
import predict

from conftest import cpu_place, build_run, CIFAR_FAST, DDP_COMMON, HERE, _precision_run, assert_state_equal, child_env, descendants, free_port, one_cycle_reference, read_jsonl, run_group, run_script, torchrun, torchrun_cmd, write_evil_checkpoint, write_image_folder, write_tiny_cifar


def test_ddp_two_processes_train_in_sync_with_exact_val_count(ddp_reference):
    out, stdout = ddp_reference
    summary = json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])
    assert summary["world_size"] == 2 and summary["weights_in_sync"] is True
    assert summary["val_images"] == 9
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and [r["train_size"] for r in rows] == [32, 48]
    for key in ("lr", "train_loss", "train_img_per_s", "data_wait_pct", "val_top1", "val_top5", "val_images", "time_s"):
        assert key in rows[0], key
    assert all(r["val_images"] == 9 for r in rows)
    losses = [float(m) for m in re.findall(r"step \d+/12 loss ([\d.]+)", stdout)]
    assert len(losses) == 24 and np.mean(losses[-6:]) < np.mean(losses[:6])  # it learns
    ck = M.load_checkpoint(out / "last.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert ck["world_size"] == 2 and ck["global_batch"] == 8 and ck["epoch"] == 2 and ck["step"] == 0
    assert ck["image_size"] == 32 and ck["eval_resize"] == 36 and ck["train_size"] == 48 and ck["stem"] == "imagenet"
    assert "step 12/12" in stdout and "data-wait" in stdout and "eta" in stdout
    # the EMA's BN statistics are its own average (all-reduced over the ranks), not a copy of the live model's
    best = M.load_checkpoint(out / "best.pt")
    ema_bn, live_bn = best["ema"]["bn1.running_mean"], best["model"]["bn1.running_mean"]
    assert not torch.equal(ema_bn, live_bn)


def _weights_fingerprint_worker(rank, world, port, differ, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    if differ and rank == 1:
        with torch.no_grad():
            net.weight[0, 0] += 1e-6
    result[rank] = imagenet_ddp.weights_fingerprint(net, torch.device("cpu"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_weights_fingerprint_sees_one_rank_differ(differ):
    import torch.multiprocessing as tmp
    ctx = tmp.get_context("fork")
    result = ctx.Manager().dict()
    port = free_port()
    procs = [ctx.Process(target=_weights_fingerprint_worker, args=(r, 2, port, differ, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert dict(result) == {0: not differ, 1: not differ}


def _interrupted_ddp(inet_data, out, sig, children, nproc=2, extra=()):
    """Start a DDP run, signal torchrun's whole process group (DataLoader workers included, as torchrun, SLURM and
    Kubernetes do) at a random step of epoch 1, and return (the step the log says it stopped at, torchrun's output)."""
    step = random.randint(2, 7)  # (the ranks' vote is read one step late: leave room before the epoch's end)
    cmd = torchrun_cmd(nproc, "--data", inet_data, "--out", out, *DDP_COMMON, *extra)
    c = children(cmd)
    c.wait_for(f"epoch 1/2 step {step}/12")
    c.signal_group(sig)
    rc, text = c.finish()
    m = re.search(rf"stopped by {signal.Signals(sig).name} at epoch 1 step (\d+); saved .*exit code {128 + sig}", text)
    assert rc != 0 and m, f"(signalled at step {step})\n" + text[-4000:]
    assert "is killed by signal" not in text and 'imagenet_ddp.py", line' not in text, text[-4000:]
    stopped = int(m.group(1))
    ck = M.load_checkpoint(out / "last.pt")
    assert ck["epoch"] == 0 and ck["step"] == stopped and step <= stopped < 12  # written at the step it names
    return stopped, text


@pytest.mark.parametrize("sig", [signal.SIGINT])  # (SIGTERM to the group: test_ddp_broken_photos_are_replaced_...)
def test_ddp_group_signal_with_workers_then_resume_is_bit_identical(ddp_reference, inet_data, tmp_path, children, sig):
    """After SIGINT, the resumed run is stopped again, by SIGTERM during epoch 1's validation (the "after the epoch"
    path), and resumed to the end: still bit-identical."""
    ref_out, _ = ddp_reference
    out = tmp_path / "run"
    stopped, _ = _interrupted_ddp(inet_data, out, sig, children)
    resumed = re.escape(f"resumed from {out / 'last.pt'} at epoch 1 step {stopped}")
    if sig == signal.SIGINT:
        c = children(torchrun_cmd(2, "--data", inet_data, "--out", out, *DDP_COMMON, "--resume", "auto"))
        c.wait_for(resumed)
        c.wait_for("epoch 1/2 step 12/12")  # the last step: the signal lands during validation
        c.signal_group(signal.SIGTERM)
        rc, text = c.finish()
        assert rc != 0 and "stopped by SIGTERM after epoch 1; saved" in text, text[-3000:]
        ck = M.load_checkpoint(out / "last.pt")
        assert ck["epoch"] == 1 and ck["step"] == 0
    res = torchrun(2, "--data", inet_data, "--out", out, *DDP_COMMON, "--resume", "auto")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sig == signal.SIGINT or re.search(resumed, res.stdout)
    a, b = M.load_checkpoint(ref_out / "last.pt"), M.load_checkpoint(out / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "epoch", "step", "ema_updates"):
        assert_state_equal(a[key], b[key])


def test_ddp_resume_on_another_world_size(ddp_reference, inet_data, tmp_path, children):
    """The same command on another number of processes, as a requeue elsewhere runs it: 1 process -> 2, with
    --global-batch 8 on both (--grad-accum 2, then 1). (2 -> 1 with --resume auto alone, the checkpoint's global batch
    setting --grad-accum 2: the elastic test.) The same batches and global batch at the same threads per process, so
    the parameters end bit for bit those of the uninterrupted 2-process run: its gradient, (g1 + g2) / 2, is what
    --grad-accum 2 sums as g1 / 2 + g2 / 2, and halving is exact. (BN's running statistics see the micro-batches in
    another order.)"""
    ref_out, _ = ddp_reference
    one_to_two = tmp_path / "1to2"
    c = children([sys.executable, os.path.join(HERE, "imagenet_ddp.py"), "--data", str(inet_data), "--out", str(one_to_two),
                  *DDP_COMMON, "--global-batch", "8"])
    c.wait_for("epoch 1/2 step 5/12")
    c.signal_group(signal.SIGTERM)
    rc, text = c.finish()
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    res = torchrun(2, "--data", inet_data, "--out", one_to_two, *DDP_COMMON, "--global-batch", "8", "--resume", "auto")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ref = M.load_checkpoint(ref_out / "last.pt")
    for folder in (one_to_two,):
        got = M.load_checkpoint(folder / "last.pt")
        for k, v in ref["model"].items():  # parameters: bit for bit (bench/README.md: "Resume on other hardware")
            if v.dtype.is_floating_point and "running" not in k:  # (BN running statistics see other splits)
                assert torch.equal(got["model"][k], v), (folder.name, k)
        assert got["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
        assert got["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"]


def rank_pid(torchrun_pid, rank):
    """The pid of a torchrun worker, found by the RANK in its environment."""
    for pid in subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_signal_to_one_rank_stops_all_at_one_step(inet_data, tmp_path, children, rank):
    """A scheduler may signal a single process: the ranks vote, stop at the same step, and the signalled rank's exit
    code 128+SIGTERM is what torchrun reports."""
    out = tmp_path / "run"
    c = children(torchrun_cmd(2, "--data", inet_data, "--out", out, *DDP_COMMON))
    c.wait_for("epoch 1/2 step 3/12")
    os.kill(rank_pid(c.proc.pid, rank), signal.SIGTERM)
    rc, text = c.finish()
    m = re.search(r"stopped by SIGTERM at epoch 1 step (\d+)", text)
    assert m and rc != 0, text[-3000:]
    assert "exitcode  : 143" in text  # torchrun's report of the signalled rank
    assert M.load_checkpoint(out / "last.pt")["step"] == int(m.group(1))


def test_ddp_two_nodes_equal_one_node_two_processes(ddp_reference, inet_data, tmp_path, children):
    ref_out, _ = ddp_reference
    port = free_port()
    nodes = [children(torchrun_cmd(1, "--data", inet_data, "--out", tmp_path / "n", *DDP_COMMON, nnodes=2, node_rank=r,
                                   port=port)) for r in (0, 1)]
    outs = [n.finish(timeout=600) for n in nodes]
    assert all(rc == 0 for rc, _ in outs), outs[0][1][-3000:]
    a, b = M.load_checkpoint(ref_out / "last.pt"), M.load_checkpoint(tmp_path / "n" / "last.pt")
    assert_state_equal(a["model"], b["model"])
    assert_state_equal(a["ema"], b["ema"])


def _alive(pids):
    """The pids that are still running (a zombie has ended: it only waits for its parent to read its exit code)."""
    alive = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(p)
        except OSError:
            pass
    return alive


def _rank_environ(agent_pid, rank):
    """The environment of a torchrun agent's worker of that RANK, or None while there is none."""
    try:
        pid = rank_pid(agent_pid, rank)
        with open(f"/proc/{pid}/environ", "rb") as f:
            return pid, dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except (AssertionError, OSError):
        return None


def _find_rank(agents, rank, timeout=120):
    """(agent, pid, environment) of the worker of that RANK under one of the agents."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for a in agents:
            found = _rank_environ(a.proc.pid, rank)
            if found:
                return (a, *found)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under any agent within {timeout} s")


def test_torchrun_restart_after_a_rank_is_killed_resumes_exactly_and_leaves_nothing(ddp_reference, inet_data, tmp_path,
                                                                                  children):
    """Two torchrun nodes (one rank each, c10d rendezvous, --max-restarts=1) and the OOM killer's SIGKILL on one
    rank mid-epoch (2 loader workers, started by a forkserver): nothing of that rank's tree (forkserver, resource
    tracker, workers) outlives it by more than a few seconds, both nodes restart their rank with the same command,
    and both resume from the last --save-every checkpoint by themselves, also when torchrun tells the healthy node's
    rank it is restart 0 (it does when that node's agent sees the other waiting before its own rank fails: a race;
    test_every_rank_takes_the_highest_restart_count checks that case for sure). The run ends bit-identical to the
    uninterrupted one, every output pipe closed.
    (Restarts also re-use torchrun's store, where the last attempt's addresses are left: see attempt_store.)"""
    ref_out, _ = ddp_reference
    out = tmp_path / "run"
    common = [("3" if a == "0" and DDP_COMMON[i - 1] == "--save-every" else a) for i, a in enumerate(DDP_COMMON)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--max-restarts=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=restart-test",
              os.path.join(HERE, "imagenet_ddp.py"), "--data", str(inet_data), "--out", str(out), *map(str, common)]
    agents = [children(launch), children(launch)]
    logging_agent, rank0, _ = _find_rank(agents, 0)  # only rank 0 logs
    logging_agent.wait_for("epoch 1/2 step 5/12")
    killed_agent, rank1, _ = _find_rank(agents, 1)
    first_worker = {logging_agent: rank0, killed_agent: rank1}
    tree = [rank1] + descendants(rank1)
    assert len(tree) >= 4, tree  # the rank, its forkserver and resource tracker, its workers
    os.kill(rank1, signal.SIGKILL)
    deadline = time.time() + 10
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.2)
    left = _alive(tree)
    for p in left:  # (re-parented to init, out of reach of the children fixture: killed here, then reported)
        os.kill(p, signal.SIGKILL)
    assert not left, left
    counts = {}  # of the restarted ranks, as torchrun tells them
    deadline = time.time() + 120
    while len(counts) < 2 and time.time() < deadline:
        for a in agents:
            for r in (0, 1):
                found = _rank_environ(a.proc.pid, r)
                if found and found[0] != first_worker[a]:
                    counts[a] = int(found[1]["TORCHELASTIC_RESTART_COUNT"])
        time.sleep(0.1)
    assert counts[killed_agent] == 1 and counts[logging_agent] in (0, 1), counts
    text = ""
    for a in agents:
        rc, lines = a.finish(timeout=300)  # (the output pipe must close: finish() reads it to its end)
        assert rc == 0, lines[-3000:]
        text += lines
    assert re.search(r"torchrun restart 1: resuming from .*last\.pt", text) and "resumed from" in text, text[-3000:]
    a, b = M.load_checkpoint(ref_out / "last.pt"), M.load_checkpoint(out / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "epoch", "step", "ema_updates"):
        assert_state_equal(a[key], b[key])


def test_an_elastic_job_goes_on_when_a_node_leaves_and_keeps_its_global_batch(ddp_reference, inet_data, tmp_path,
                                                                           children):
    """torchrun --nnodes=1:2 on two agents (one rank each); the node that does not host the c10d rendezvous dies whole
    (SIGKILL to its agent, rank and workers) mid-epoch. The survivor's rank fails on its next all-reduce, torchrun re-forms a 1-node
    world with the same command, and the rank resumes from last.pt with --grad-accum 2 derived from its global batch
    of 8. Its parameters end bit for bit those of the uninterrupted 2-process run. About 35 s."""
    ref_out, _ = ddp_reference
    out = tmp_path / "run"
    common = [("3" if a == "0" and DDP_COMMON[i - 1] == "--save-every" else a) for i, a in enumerate(DDP_COMMON)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=elastic-test",
              # (not the default 30 s wait for more nodes after each (re)start; above the 2 s between the agents' starts)
              "--rdzv-conf=last_call_timeout=10",
              os.path.join(HERE, "imagenet_ddp.py"), "--data", str(inet_data), "--out", str(out), *common]
    agents = [children(launch)]
    time.sleep(2)  # the first agent hosts the c10d rendezvous (its store): the node that leaves is the other one
    agents.append(children(launch))  # (both join the first round: 2 nodes, the most it allows)
    survivor, leaving = agents
    _find_rank(agents, 0)[0].wait_for("epoch 1/2 step 5/12")  # (only rank 0 logs)
    leaving.kill()
    rc, text = survivor.finish(timeout=300)
    assert rc == 0, text[-3000:]
    assert "torchrun restart 1: resuming from" in text, text[-3000:]
    assert "resuming a 2-process run on 1 process(es) with --grad-accum 2: the same global batch (8)" in text, text[-3000:]
    ref, got = M.load_checkpoint(ref_out / "last.pt"), M.load_checkpoint(out / "last.pt")
    assert (got["epoch"], got["step"]) == (2, 0)
    for k, v in ref["model"].items():
        if v.dtype.is_floating_point and "running" not in k:
            assert torch.equal(got["model"][k], v), k


def test_every_rank_takes_the_highest_restart_count(tmp_path):
    """torchrun counts restarts per node: a node whose rank did not fail restarts it as restart 0. Every rank must
    resume when any was restarted, so each takes the highest count of all (2 gloo ranks told 0 and 1). About 6 s."""
    script = tmp_path / "restarts.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import torch.distributed as dist
import imagenet_ddp
os.environ["TORCHELASTIC_RESTART_COUNT"] = os.environ["RANK"]  # rank 1's node was restarted, rank 0's was not
place = imagenet_ddp.setup_distributed("cpu", "off")
print(f"rank {{place.rank}} restarts {{place.restarts}}", flush=True)
dist.destroy_process_group()
""")
    res = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0 restarts 1" in res.stdout and "rank 1 restarts 1" in res.stdout, res.stdout


def test_a_restarted_rank_waits_for_its_own_rank_0_not_the_name_the_last_attempt_left(monkeypatch):
    """torchrun's store outlives an attempt (torch 2.14): rank 1 of the new attempt comes first and finds the
    finished attempt's name and echo there. It must wait for the new rank 0 and then share one fresh namespace with
    it (taking the old name is how the CI run failed: gloo connected to the dead rank 0's port). Under a second."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for key, value in (("imagenet_ddp/attempt", "old"), ("old/nonce/1", "n"), ("old/echo/1", "n")):
        server.set(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = {}
    rank1 = threading.Thread(target=lambda: got.update(store=imagenet_ddp.attempt_store(1, timeout_s=20)), daemon=True)
    rank1.start()
    time.sleep(0.5)
    assert rank1.is_alive() and not got, "rank 1 took the last attempt's namespace"
    store0 = imagenet_ddp.attempt_store(0, timeout_s=20)
    rank1.join(20)
    assert "store" in got and server.get("imagenet_ddp/attempt") != b"old"
    store0.set("written by", "rank 0")
    assert got["store"].get("written by") == b"rank 0"


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MB tmpfs of the test's own (mounting needs root: skipped, with the reason, where it is refused)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): the full-disk tests need root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _pause_when_written(child, path, timeout=240):
    """SIGSTOP the child's process group as soon as `path` appears (written atomically: whole when it appears)."""
    deadline = time.time() + timeout
    while not path.exists():
        assert child.proc.poll() is None and time.time() < deadline, "".join(child.lines)[-3000:]
        time.sleep(0.02)
    child.signal_group(signal.SIGSTOP)


def _fill_disk(folder):
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)


@pytest.mark.parametrize("trainer", ["imagenet_ddp", "cifar"])
def test_a_full_or_read_only_disk_ends_the_run_in_one_line_and_keeps_last_pt(trainer, small_disk, inet_data, tmp_path,
                                                                            children):
    """imagenet_ddp.py (--save-every 3): the disk fills after the step-3 last.pt, so the step-6 one fails (ENOSPC).
    cifar.py: the disk turns read-only after epoch 1, so epoch 2's metrics.jsonl fails (EROFS). Each run ends
    with exit 4 and one line naming the file and the error, no temporary file is left, and last.pt is the one
    written before, byte for byte. About 10 s each."""
    out = small_disk / "run"
    if trainer == "imagenet_ddp":
        common = [("3" if a == "0" and DDP_COMMON[i - 1] == "--save-every" else a) for i, a in enumerate(DDP_COMMON)]
        args = ["--data", inet_data, *common, "--workers", "1"]
        failing, error = out / "last.pt", "No space left on device (ENOSPC)"
    else:
        args = ["--dataset", "cifar10", "--data-dir", write_tiny_cifar(tmp_path / "c", n_train=64, n_test=20),
                "--epochs", "2", *CIFAR_FAST]
        failing, error = out / "metrics.jsonl", "Read-only file system (EROFS)"
    c = children([sys.executable, os.path.join(HERE, f"{trainer}.py"), *map(str, args), "--out", str(out)])
    _pause_when_written(c, out / "last.pt")
    kept = (out / "last.pt").read_bytes()
    if trainer == "imagenet_ddp":
        _fill_disk(small_disk)
    else:
        res = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    c.signal_group(signal.SIGCONT)
    rc, text = c.finish()
    assert rc == 4 and "Traceback" not in text, text[-3000:]
    assert [l for l in text.splitlines() if "error:" in l] == [f"{trainer}.py: error: cannot write {failing}: {error}"]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    assert (out / "last.pt").read_bytes() == kept
    ck = M.load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == ((0, 3) if trainer == "imagenet_ddp" else (1, 0))


def test_an_absurd_lr_stops_each_trainer_with_one_line_and_exit_3(tmp_path, inet_data):
    """The loss turns non-finite in the first epoch: each trainer stops at the first log line after it (one process,
    and 2 under torchrun: every rank at the same step), prints one line naming the epoch, step, LR and precision and
    what to try, exits 3, and writes no checkpoint (there is no finite state to keep yet)."""
    data = write_tiny_cifar(tmp_path / "c", n_train=128, n_test=20)
    res = run_script("cifar.py", "--dataset", "cifar10", "--data-dir", data, "--epochs", "2", "--lr", "1e5",
                     "--out", tmp_path / "c_run", *CIFAR_FAST)
    inet = ["--data", inet_data, "--arch", "resnet18", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
            "--lr", "1e6", "--log-every", "1"]
    one = run_script("imagenet_ddp.py", *inet, "--workers", "0", "--out", tmp_path / "i_run")
    two = torchrun(2, *inet, "--workers", "1", "--out", tmp_path / "d_run")
    for r, out in ((res, "c_run"), (one, "i_run"), (two, "d_run")):
        lines = [l for l in r.stderr.splitlines() if "error:" in l]
        assert len(lines) == 1 and re.search(r"training loss is not finite by epoch 1 step \d+ \(lr [\d.e+]+, (fp32|bf16)\)",
                                              lines[0]) and "--lr" in lines[0], r.stderr[-3000:]
        assert 'cifar.py", line' not in r.stderr and 'imagenet_ddp.py", line' not in r.stderr, r.stderr[-3000:]  # (torchrun's own may follow)
        assert not (tmp_path / out / "last.pt").exists() and not (tmp_path / out / "best.pt").exists()
    assert res.returncode == 3 and one.returncode == 3
    # Under torchrun every rank raises at the same step, but the first to exit makes torchrun SIGTERM the others, so
    # what a user can rely on is torchrun's root cause (the first failure), which must be exit 3, and no rank failing
    # otherwise: each listed rank exited 3 on its own or was ended by torchrun's SIGTERM (-15).
    root = two.stderr.split("Root Cause (first observed failure):", 1)[-1]
    assert two.returncode != 0 and re.search(r"exitcode\s*: 3\b", root), two.stderr[-3000:]
    assert set(re.findall(r"exitcode\s*: (-?\d+)", two.stderr)) <= {"3", "-15"}, two.stderr[-3000:]


def _poison_after(monkeypatch, module, calls):
    """After the given number of training steps, every weight of the first conv turns NaN (a diverging run)."""
    real, count = module.train_step, [0]

    def step(run, *a, **k):
        out = real(run, *a, **k)
        count[0] += 1
        if count[0] == calls:
            with torch.no_grad():
                run.model.conv1.weight.fill_(float("nan"))
        return out
    monkeypatch.setattr(module, "train_step", step)


def _finite_checkpoint(path):
    ck = M.load_checkpoint(path)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.dtype.is_floating_point), path
    return ck


def test_a_run_that_diverges_keeps_its_last_finite_checkpoints(tmp_path, monkeypatch, capsys):
    """Weights that turn NaN in the middle of a run: the trainer stops at its next check (a log line in cifar.py; a
    --save-every save in imagenet_ddp.py, before it writes), exits 3, and last.pt and best.pt keep the last finite
    state: nothing non-finite is ever written, and the metrics stop at the last good epoch."""
    data = write_tiny_cifar(tmp_path / "c", n_train=128, n_test=20)
    _poison_after(monkeypatch, cifar, 10)  # epoch 2, step 2 (8 steps an epoch)
    out = tmp_path / "c_run"
    assert cifar.main(["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "3", "--amp", "off", "--out", str(out),
                       *CIFAR_FAST]) == cifar.EXIT_DIVERGED
    assert "not finite by epoch 2 step 3 " in capsys.readouterr().err
    assert _finite_checkpoint(out / "last.pt")["epoch"] == 1 and _finite_checkpoint(out / "best.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    monkeypatch.undo()
    data = write_image_folder(tmp_path / "i", per_class=(8, 1), size=32)
    _poison_after(monkeypatch, imagenet_ddp, 3)
    out = tmp_path / "i_run"
    assert imagenet_ddp.main(["--data", str(data), "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
                              "--batch-size", "4", "--workers", "0", "--amp", "off", "--save-every", "2", "--log-every", "50",
                              "--out", str(out)]) == imagenet_ddp.EXIT_DIVERGED
    assert "not finite by epoch 1 step 4 " in capsys.readouterr().err
    ck = _finite_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == (0, 2) and not (out / "best.pt").exists()


def test_ddp_evaluate_agrees_on_1_and_2_processes_and_with_the_training_figure(ddp_reference, inet_data):
    ref_out, _ = ddp_reference
    one = run_script("imagenet_ddp.py", "--data", inet_data, "--evaluate", "--checkpoint", ref_out / "best.pt",
                     "--batch-size", "4", "--workers", "0")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "--data", inet_data, "--evaluate", "--checkpoint", ref_out / "best.pt", "--batch-size", "4",
                   "--workers", "0")
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads(one.stdout.strip().splitlines()[-1])
    r2 = json.loads([l for l in two.stdout.splitlines() if l.startswith("{")][-1])
    assert {"val_top1", "val_top5", "val_loss", "val_images"} <= set(r1)
    assert r1["val_images"] == r2["val_images"] == 9 and r1["val_size"] == 32 and r1["val_resize"] == 36
    assert r1["val_top1"] == r2["val_top1"] and r1["val_top5"] == r2["val_top5"]
    assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-5)
    best = M.load_checkpoint(ref_out / "best.pt")  # the EMA weights, evaluated during training on 2 processes
    row = next(r for r in read_jsonl(ref_out / "metrics.jsonl") if r["epoch"] == best["epoch"])
    assert best["val_top1"] == row["val_top1"] == r1["val_top1"]
    assert row["val_loss"] == pytest.approx(r1["val_loss"], rel=1e-5)
    # ... and what a direct computation gives: model.py's preprocessing of each photo, the checkpoint's network
    net = M.model_from_checkpoint(best).eval().to(memory_format=torch.channels_last)
    val = M.list_train_val(str(inet_data))["val"]
    x = torch.stack([M.eval_image(path, 32, 36) for path, _ in val])
    y = torch.tensor([label for _, label in val])
    amp = imagenet_ddp.pick_amp("auto", torch.device("cpu"))
    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        logits = torch.cat([net(M.normalize(x[i:i + 4], M.IMAGENET_MEAN, M.IMAGENET_STD, True)).float()
                            for i in range(0, len(y), 4)])
    assert r1["val_top1"] == 100.0 * (logits.argmax(1) == y).sum().item() / len(y)
    assert r1["val_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-4)


def test_ddp_bad_input_fails_fast_on_every_rank(tmp_path, inet_data):
    write_image_folder(tmp_path / "noval", splits=("train",))
    t0 = time.time()
    res = torchrun(2, "--data", tmp_path / "noval", "--out", tmp_path / "o", "--arch", "resnet18")
    assert res.returncode != 0 and time.time() - t0 < 120
    assert res.stderr.count("imagenet_ddp.py: error:") == 1 and "noval must hold train/<class>/* and val/<class>/*" in res.stderr  # said once, by rank 0
    assert 'imagenet_ddp.py", line' not in res.stderr + res.stdout
    assert not (tmp_path / "o").exists()
    res = torchrun(2, "--data", inet_data, "--out", tmp_path / "o", "--arch", "resnet18", "--sync-bn")
    assert res.returncode != 0 and res.stderr.count("--sync-bn needs CUDA") == 1, res.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def _ddp_error(capsys, *argv):
    rc = imagenet_ddp.main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "error:" in err, err
    return err


def test_ddp_bad_inputs_single_process(capsys, tmp_path, inet_data):
    assert "missing must hold train/" in _ddp_error(capsys, "--data", tmp_path / "missing")
    write_image_folder(tmp_path / "mism", splits=("train",))
    write_image_folder(tmp_path / "mism", splits=("val",), classes=("cat", "dog", "owl"))
    assert "different classes" in _ddp_error(capsys, "--data", tmp_path / "mism")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    assert "no images" in _ddp_error(capsys, "--data", tmp_path / "empty")
    assert "--evaluate needs" in _ddp_error(capsys, "--data", inet_data, "--evaluate")
    assert "--epochs" in _ddp_error(capsys, "--data", inet_data, "--epochs", "0")
    assert "--warmup-epochs" in _ddp_error(capsys, "--data", inet_data, "--epochs", "2", "--warmup-epochs", "3")
    assert "go together" in _ddp_error(capsys, "--data", inet_data, "--min-train-size", "128")
    assert "--val-resize" in _ddp_error(capsys, "--data", inet_data, "--val-size", "64", "--val-resize", "48")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _ddp_error(capsys, "--data", inet_data, "--device", "cuda", "--out", tmp_path / "o")
    trunc = tmp_path / "t.pt"
    trunc.write_bytes(b"PK\x03\x04 truncated")
    assert "cannot be read" in _ddp_error(capsys, "--data", inet_data, "--evaluate", "--checkpoint", trunc)
    write_evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    assert "refused" in _ddp_error(capsys, "--data", inet_data, "--resume", tmp_path / "evil.pt", "--out", tmp_path / "o")
    assert not (tmp_path / "pwned").exists()


def test_ddp_broken_photos_are_replaced_named_once_and_resume_exactly(tmp_path, children):
    """A truncated and an empty JPEG among the training photos, an empty one among the validation photos, under
    torchrun with 2 processes and --workers 2: each training photo is replaced (the run goes on), named once, and
    counted in every epoch's metrics row; the validation photo is named once and left out of val_images. A run
    stopped mid-epoch (SIGTERM to torchrun's process group) and resumed ends bit-identical to the uninterrupted one.
    One epoch each: about 35 s."""
    data = write_image_folder(tmp_path / "d", per_class=(32, 3), size=40)
    cat = sorted((data / "train" / "cat").iterdir())
    cat[0].write_bytes(cat[0].read_bytes()[:300])  # truncated: the header reads, the pixels do not
    cat[1].write_bytes(b"")
    val_dog = sorted((data / "val" / "dog").iterdir())[0]
    val_dog.write_bytes(b"")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    one_epoch = [*DDP_COMMON, "--epochs", "1"]
    res = torchrun(2, "--data", data, "--out", whole, *one_epoch)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for photo in cat[:2]:
        assert len(re.findall(rf"{re.escape(str(photo))}: cannot read image.*; replaced by", res.stdout)) == 1, res.stdout
    assert len(re.findall(rf"{re.escape(str(val_dog))}: cannot read image; left out", res.stdout)) == 1, res.stdout
    rows = read_jsonl(whole / "metrics.jsonl")
    assert [(r["broken_train_images"], r["val_images"]) for r in rows] == [(2, 8)]
    c = children(torchrun_cmd(2, "--data", data, "--out", stopped, *one_epoch))
    c.wait_for(f"epoch 1/1 step {random.randint(2, 7)}/12")
    c.signal_group(signal.SIGTERM)
    rc, text = c.finish()
    assert rc != 0 and re.search(r"stopped by SIGTERM at epoch 1 step \d+; saved", text), text[-3000:]
    res = torchrun(2, "--data", data, "--out", stopped, *one_epoch, "--resume", "auto")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = M.load_checkpoint(whole / "last.pt"), M.load_checkpoint(stopped / "last.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "epoch", "step", "ema_updates"):
        assert_state_equal(a[key], b[key])
    got = read_jsonl(stopped / "metrics.jsonl")
    assert [(r["broken_train_images"], r["val_images"], r["val_top1"]) for r in got] == [
        (r["broken_train_images"], r["val_images"], r["val_top1"]) for r in rows]


EXIT_PROBE = """import os, sys
sys.path.insert(0, sys.argv.pop(1))
import imagenet_ddp
if __name__ == "__main__":  # (the loader's forkserver imports this file too)
    rc = imagenet_ddp.main(sys.argv[1:])
    left = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print(f"rank {os.environ['RANK']} threads after main: {left}", flush=True)
    sys.exit(rc)
"""


def test_ddp_ranks_end_their_process_group_before_the_interpreter_exits(tmp_path, inet_data):
    """The SIGABRT at exit ("terminate called without an active exception", a finished run reported FAILED): gloo's
    threads ran on into the interpreter's exit, the process group kept alive by torch.distributed.nn's default
    arguments and by reference cycles (matplotlib's mathtext, which draws the log-scale LR axis of curves.png, leaves
    tracebacks that hold the frames up to fit()). A fresh 2-rank run (loader workers, curves drawn) and a resume of it
    must each exit 0 with every rank down to its main thread when main() returns."""
    probe = tmp_path / "probe.py"
    probe.write_text(EXIT_PROBE)
    args = ["--data", inet_data, "--out", tmp_path / "run", "--arch", "resnet18", "--image-size", "32", "--batch-size",
            "4", "--workers", "1", "--log-every", "50", "--epochs", "2"]  # (2: a log-scale LR axis, drawn with mathtext)
    for extra in ([], ["--resume", "auto"]):
        res = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", probe,
                         HERE, *map(str, args), *extra])
        assert res.returncode == 0 and "terminate called" not in res.stderr, res.stdout[-2000:] + res.stderr[-3000:]
        for rank in (0, 1):
            assert f"rank {rank} threads after main: ['python']" in res.stdout, res.stdout[-3000:]


def test_ddp_broken_training_photos_past_the_limit_stop_the_run_in_one_line(capsys, tmp_path):
    """Past --max-broken-images the run stops with one line naming the first few; a photo whose replacements are all
    broken too stops it at once. In the main process and in a DataLoader worker (whose traceback wraps the error)."""
    write_image_folder(tmp_path / "d", per_class=(4, 2))
    (tmp_path / "d" / "train" / "cat" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    common = ["--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size", "2"]
    for workers in ("0", "1"):
        err = _ddp_error(capsys, "--data", tmp_path / "d", "--out", tmp_path / f"o{workers}", *common, "--workers", workers,
                         "--max-broken-images", "0")
        assert err == ("imagenet_ddp.py: error: 1 training photos cannot be decoded (more than --max-broken-images 0), "
                       f"among them {tmp_path / 'd' / 'train' / 'cat' / 'zz_broken.jpg'}: check the copy of the data set, "
                       "or raise the limit"), err
    write_image_folder(tmp_path / "all", per_class=(1, 1))
    for photo in (tmp_path / "all" / "train").glob("*/*"):
        photo.write_bytes(b"")
    for workers in ("0", "1"):
        err = _ddp_error(capsys, "--data", tmp_path / "all", "--out", tmp_path / f"a{workers}", *common, "--batch-size",
                         "1", "--workers", workers)
        assert "cannot be decoded, nor any of the 16 training photos drawn to replace it" in err, err


def test_short_runs_cap_the_default_warm_up():
    args = imagenet_ddp.get_args(["--epochs", "1"])
    assert args.warmup_epochs == 0.25 and "capped" in args.warmup_note
    assert imagenet_ddp.get_args(["--epochs", "2"]).warmup_epochs == 0.5
    long = imagenet_ddp.get_args(["--epochs", "90"])
    assert long.warmup_epochs == 5 and long.warmup_note is None
    assert imagenet_ddp.get_args(["--epochs", "2", "--warmup-epochs", "1"]).warmup_note is None


def test_ddp_schedules_and_scaled_lr():
    """Cosine with linear warm-up, and One Cycle: LR per step against the formulas; peak = lr x global batch / 256."""
    args = imagenet_ddp.get_args(["--epochs", "4", "--warmup-epochs", "1", "--lr", "0.2", "--batch-size", "32",
                                  "--grad-accum", "2"])
    run = build_run(imagenet_ddp, args, 3, 10)
    peak = 0.2 * 32 * 2 / 256
    lrs = []
    for step in range(40):
        lrs.append(run.opt.param_groups[0]["lr"])
        run.opt.step()
        run.sched.step()
    assert lrs[:10] == pytest.approx([peak * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(peak) and lrs[25] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    assert run.opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    oc = build_run(imagenet_ddp, imagenet_ddp.get_args(["--epochs", "4", "--warmup-epochs", "1", "--lr", "0.2",
                                                       "--batch-size", "32", "--schedule", "onecycle"]), 3, 10)
    peak = 0.2 * 32 / 256
    got = []
    for step in range(41):
        got.append((oc.opt.param_groups[0]["lr"], oc.opt.param_groups[0]["momentum"]))
        oc.opt.step()
        oc.sched.step() if step < 40 else None
    for step, (lr, mom) in enumerate(got):
        ref_lr, ref_mom = one_cycle_reference(step, 41, peak, 25.0, 1e4, 10 / 41, "cos", 0.9, 0.85)
        assert lr == pytest.approx(ref_lr, rel=1e-6, abs=1e-12) and mom == pytest.approx(ref_mom, rel=1e-6), step


def test_ddp_flags_reach_the_model_and_optimizer():
    make = lambda *f: build_run(imagenet_ddp, imagenet_ddp.get_args(["--amp", "off", *f]), 3, 10)
    base = make()
    assert not base.opt.defaults["nesterov"] and base.opt.defaults["momentum"] == 0.9
    decay, no_decay = base.opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert base.model.conv1.kernel_size == (7, 7) and isinstance(base.model.maxpool, nn.MaxPool2d)
    assert base.model.conv1.weight.is_contiguous(memory_format=torch.channels_last) and base.fwd is base.model
    other = make("--nesterov", "--momentum", "0.8", "--wd", "0.02", "--zero-init-residual", "--no-channels-last",
                 "--compile", "--arch", "resnet18", "--ema", "0.99", "--seed", "3")
    assert other.opt.defaults["nesterov"] and other.opt.defaults["momentum"] == 0.8
    assert other.opt.param_groups[0]["weight_decay"] == 0.02 and other.ema.decay == 0.99
    assert all(torch.all(b.bn2.weight == 0) for b in other.model.modules() if isinstance(b, M.BasicBlock))
    assert not other.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(other.fwd, torch._dynamo.eval_frame.OptimizedModule)
    a, b = make("--arch", "resnet18"), make("--arch", "resnet18", "--seed", "3")
    assert not torch.equal(a.model.conv1.weight, b.model.conv1.weight)
    assert torch.equal(b.model.conv1.weight, other.model.conv1.weight.contiguous())


@pytest.mark.parametrize("amp,channels_last,dtype", [("off", False, torch.float32), ("bf16", True, torch.bfloat16)])
def test_ddp_precision_memory_format_label_smoothing_are_used(amp, channels_last, dtype):
    args = imagenet_ddp.get_args(["--arch", "resnet18", "--amp", amp, "--batch-size", "4", "--label-smoothing", "0.2"]
                                 + ([] if channels_last else ["--no-channels-last"]))
    run = build_run(imagenet_ddp, args, 3, 10)
    seen = {}
    run.model.layer1.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype, cl=o.is_contiguous(memory_format=torch.channels_last)))
    batch = (torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    before = copy.deepcopy(run.model)
    sums = imagenet_ddp.EpochSums(run.place.device)
    imagenet_ddp.train_step(run, itertools.repeat(batch), None, sums)
    assert seen == {"dtype": dtype, "cl": channels_last}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=amp != "off"):
        logits = before(M.normalize(batch[0], M.IMAGENET_MEAN, M.IMAGENET_STD, channels_last)).float()
    smoothed = nn.functional.cross_entropy(logits, batch[1], label_smoothing=0.2).item()
    recorded, plain = sums.local_loss.item() / 4, nn.functional.cross_entropy(logits, batch[1]).item()
    assert sums.seen == 4 and recorded == pytest.approx(smoothed, rel=1e-3)
    # the recorded loss is the smoothed one, not the plain one (a new network's near-uniform logits put the two
    # within 1e-3 of each other in bf16, so the test compares distances)
    assert abs(recorded - smoothed) < 0.1 * abs(plain - smoothed)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker")  # (3 on purpose: not the default here)
def test_ddp_mixing_and_workers_flags(inet_data):
    draws = lambda *f: {imagenet_ddp.step_mix(imagenet_ddp.get_args(list(f)), 0, s, 32)[0] for s in range(30)}
    assert imagenet_ddp.step_mix(imagenet_ddp.get_args([]), 0, 0, 32) is None
    assert draws("--mixup", "0.2") == {"mixup"} and draws("--cutmix", "1.0") == {"cutmix"}
    assert draws("--mixup", "0.2", "--cutmix", "1.0") == {"mixup", "cutmix"}
    args = imagenet_ddp.get_args(["--data", str(inet_data), "--arch", "resnet18", "--workers", "3", "--epochs", "2", "--batch-size", "8",
                                  "--out", "unused-never-written"])
    place = cpu_place(imagenet_ddp, args)
    run, loop = imagenet_ddp.start(args, imagenet_ddp.check_inputs(args, place), place)
    assert loop.loader.num_workers == 3 and loop.loader.worker_init_fn.func is imagenet_ddp.worker_init


def test_train_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    from PIL import Image
    write_image_folder(tmp_path / "d", per_class=(2, 1), size=64)
    Image.new("L", (50, 70), 100).save(tmp_path / "d" / "train" / "cat" / "gray.png")
    Image.new("CMYK", (64, 48)).save(tmp_path / "d" / "train" / "dog" / "cmyk.jpg")
    train = M.list_train_val(str(tmp_path / "d"))["train"]
    args = imagenet_ddp.get_args(["--image-size", "32", "--train-size", "48", "--min-train-size", "32", "--ramp-epochs", "3", "4"])
    ds = imagenet_ddp.TrainSet(train, args)
    for i in range(len(train)):
        item = ds[(3, i)]
        x, y, replaced = item["image"], item["label"], item["replaced"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == train[i][1] and replaced == -1
        assert torch.equal(x, ds[(3, i)]["image"])  # same (seed, epoch, index): same pixels
        assert ds[(4, i)]["image"].shape == (3, 48, 48)  # the size follows the epoch
    assert not torch.equal(ds[(3, 0)]["image"], ds[(2, 0)]["image"])  # another epoch: another crop
    # --color-jitter and --min-scale change the draws
    draws = [imagenet_ddp.draw_augmentation(args, 0, i, 400, 300) for i in range(300)]
    assert min(d["box"][2] * d["box"][3] for d in draws) < 0.15 * 400 * 300 and all(d["factors"] is not None for d in draws)
    tight = imagenet_ddp.get_args(["--min-scale", "0.5", "--color-jitter", "0"])
    tdraws = [imagenet_ddp.draw_augmentation(tight, 0, i, 400, 300) for i in range(300)]
    assert min(d["box"][2] * d["box"][3] for d in tdraws) >= 0.49 * 400 * 300 and all(d["factors"] is None for d in tdraws)
    # the global order splits identically whatever the world size, given the same global batch
    one = list(imagenet_ddp.EpochBatches(50, 8, 1, 0, 1, 0))
    two = [list(imagenet_ddp.EpochBatches(50, 4, 2, r, 1, 0)) for r in (0, 1)]
    accum = list(imagenet_ddp.EpochBatches(50, 4, 1, 0, 2, 0))
    for step, batch in enumerate(one):
        assert batch == two[0][step] + two[1][step] == accum[2 * step] + accum[2 * step + 1]
    s = imagenet_ddp.EpochBatches(50, 8, 1, 0, 1, 0)
    s.set_epoch(0, start_step=4)
    assert list(s) == one[4:] and len(s) == 2


def test_progressive_resizing_schedule():
    args = imagenet_ddp.get_args(["--epochs", "40", "--train-size", "192", "--min-train-size", "160", "--ramp-epochs", "25", "34"])
    sizes = [imagenet_ddp.train_size_at(args, e) for e in range(40)]
    assert sizes[:26] == [160] * 26 and sizes[34:] == [192] * 6
    assert all(s % 32 == 0 for s in sizes) and sizes == sorted(sizes)  # FFCV's steps of 32 pixels, never shrinking
    assert imagenet_ddp.train_size_at(imagenet_ddp.get_args(["--image-size", "128"]), 7) == 128


def test_crop_sampler_matches_torchvision_distribution():
    """Scale and aspect ratio of our RandomResizedCrop boxes against torchvision's get_params: a two-sample
    Kolmogorov-Smirnov test per quantity (n = 3000 each; the 0.1% critical distance is 1.95 sqrt(2/n) = 0.050)."""
    import torchvision.transforms as T
    from PIL import Image
    args = imagenet_ddp.get_args(["--min-scale", "0.08"])
    ours = [imagenet_ddp.draw_augmentation(args, 0, i, 400, 300)["box"] for i in range(3000)]
    torch.manual_seed(0)
    img = Image.new("RGB", (400, 300))
    theirs = [T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)]  # (top, left, h, w)
    ks = lambda a, b: np.abs(np.searchsorted(np.sort(a), np.sort(np.r_[a, b]), side="right") / len(a)
                             - np.searchsorted(np.sort(b), np.sort(np.r_[a, b]), side="right") / len(b)).max()
    for name, f in (("scale", lambda w, h: w * h / 120000), ("ratio", lambda w, h: w / h), ("x0", None)):
        if f is None:
            a, b = np.array([o[0] / 400 for o in ours]), np.array([t[1] / 400 for t in theirs])
        else:
            a, b = np.array([f(o[2], o[3]) for o in ours]), np.array([f(t[3], t[2]) for t in theirs])
        assert ks(a, b) < 0.050, name
    assert all(0 <= x0 and x0 + w <= 400 and 0 <= y0 and y0 + h <= 300 for x0, y0, w, h in ours)


def test_the_default_number_of_workers(monkeypatch):
    """The default --workers: this rank's share of the cores less one, at least 1, at most 16."""
    for cores, local_world, workers in ((2, 1, 1), (2, 2, 1), (16, 1, 15), (128, 8, 15), (192, 1, 16), (1, 1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
        assert imagenet_ddp.get_args([]).workers == workers, (cores, local_world)
    assert imagenet_ddp.get_args(["--workers", "3"]).workers == 3


SYNSETS = ("n01440764", "n02102040", "n02979186")  # tench, English springer, cassette player


def test_ddp_save_every_synset_names_and_tensorboard(tmp_path, monkeypatch, capsys):
    """--save-every N writes a mid-epoch last.pt every N steps (and 0: at epoch ends only); a run on ImageNet-style
    synset folders records the class names people read, which predict.py prints; --tensorboard writes the scalars."""
    data = write_image_folder(tmp_path / "synsets", per_class=(32, 3), size=40, classes=SYNSETS)
    saved = []
    real = M.save_checkpoint
    monkeypatch.setattr(M, "save_checkpoint", lambda path, **s: (saved.append((os.path.basename(path), s["epoch"], s.get("step"))),
                                                                 real(path, **s)))
    base = ["--data", str(data), "--arch", "resnet18", "--image-size", "32", "--epochs", "2", "--batch-size", "8",
            "--workers", "0", "--log-every", "50"]
    assert imagenet_ddp.main(base + ["--out", str(tmp_path / "a"), "--save-every", "5", "--tensorboard"]) == 0
    assert [s for s in saved if s[0] == "last.pt"] == [("last.pt", 0, 5), ("last.pt", 0, 10), ("last.pt", 1, 0),
                                                      ("last.pt", 1, 5), ("last.pt", 1, 10), ("last.pt", 2, 0)]
    saved.clear()
    assert imagenet_ddp.main(base + ["--out", str(tmp_path / "b"), "--save-every", "0"]) == 0
    assert [s for s in saved if s[0] == "last.pt"] == [("last.pt", 1, 0), ("last.pt", 2, 0)]
    best = M.load_checkpoint(tmp_path / "a" / "best.pt")
    assert best["classes"] == list(SYNSETS) and best["class_names"] == ["tench", "English springer", "cassette player"]
    capsys.readouterr()
    img = sorted((data / "val" / SYNSETS[0]).iterdir())[0]
    assert predict.main([str(img), "--checkpoint", str(tmp_path / "a" / "best.pt"), "--json"]) == 0
    labels = [t["label"] for t in json.loads(capsys.readouterr().out)["top"]]
    assert sorted(labels) == sorted(best["class_names"])
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard not installed (pip install -r requirements-demo.txt): scalars not checked")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / "a"))
    ea.Reload()
    assert {"lr", "train_loss", "val_top1", "val_loss", "data_wait_pct"} <= set(ea.Tags()["scalars"])
    assert [e.value for e in ea.Scalars("val_top1")] == pytest.approx([r["val_top1"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")])


@pytest.mark.parametrize("module", [cifar, imagenet_ddp], ids=["cifar", "imagenet_ddp"])
def test_resume_switches_precision(module, tmp_path):
    """A job started in fp16 (V100, T4) may be requeued on bf16 hardware, or in fp32, and back: all six switches
    restore (the GradScaler's state is dropped or created as the new precision needs), and fp16 -> fp16 keeps it."""
    states = {}
    for amp in ("fp16", "bf16", "off"):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            run = _precision_run(module, amp, tmp_path)
        assert not [w for w in said if "lr_scheduler" in str(w.message)], amp
        if amp == "fp16":
            # (the scaler skipped this first step, its gradients overflowed, as it does while its scale settles:
            # a run says nothing about the schedule stepping without the optimizer)
            assert run.scaler.get_scale() == 32768.0
            run.scaler.update(1234.0)  # a loss scale a fresh scaler would not have
        states[amp] = module.training_state(run)
        assert states[amp]["amp"] == {"off": "fp32"}.get(amp, amp)
    restore = lambda ck, run: module.restore_training_state(ck, run, lambda msg: None)
    for old in ("fp16", "bf16", "off"):
        for new in ("fp16", "bf16", "off"):
            run = _precision_run(module, new, tmp_path, step=False)
            restore(dict(states[old], world_size=1, global_batch=4), run)  # (what last.pt adds)
            assert_state_equal(run.model.state_dict(), states[old]["model"])
            if new == "fp16":
                assert run.scaler.get_scale() == (1234.0 if old == "fp16" else 65536.0), (old, new)
            else:
                assert not run.scaler.is_enabled() and run.scaler.state_dict() == {}


def _loader_worker_pids(loader_iter):
    return [w.pid for w in loader_iter._workers]


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_loader_workers_ignore_stop_signals(method, tmp_path):
    """Workers started by the trainers' loader survive SIGTERM, SIGINT and SIGUSR1 (a process group's signal reaches
    them too), whatever the start method, and the epoch's batches all arrive."""
    write_image_folder(tmp_path / "d", per_class=(8, 1), size=24)
    train = M.list_train_val(str(tmp_path / "d"))["train"]
    ds = imagenet_ddp.TrainSet(train, imagenet_ddp.get_args(["--image-size", "16"]))
    sampler = imagenet_ddp.EpochBatches(len(train), 2, 1, 0, 1, 0)
    loader = imagenet_ddp.make_loader(ds, 2, torch.device("cpu"), method, batch_sampler=sampler)
    with imagenet_ddp.stop_signals_blocked():
        it = iter(loader)
    try:
        first = [next(it), next(it)]  # (one batch from each worker: both are up)
        for pid in _loader_worker_pids(it):
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                os.kill(pid, sig)
        time.sleep(0.5)
        rest = list(it)
        assert len(rest) + 2 == sampler.steps and first[0]["image"].shape == (2, 3, 16, 16)
    finally:
        it._shutdown_workers()  # (a failure must not leave workers that ignore SIGTERM behind)


def test_loaders_under_a_process_group_start_workers_from_a_forkserver(tmp_path):
    """A rank must not fork() its loader workers: the process group's threads can hold Python's thread-state lock at
    that moment, and the child then hangs for ever (CPython gh-112275; it hung this suite's DDP tests). Under a
    process group the workers come from a forkserver, which must outlive a launcher's signal to the process group
    (the workers it forks exit when it dies). A single process keeps fork. (In a fresh interpreter, as a rank is:
    the forkserver is one per process, and another test may have started it.)"""
    write_image_folder(tmp_path / "d", per_class=(4, 1), size=24)
    code = f"""if __name__ == "__main__":
    import os, signal, sys, time, torch
    sys.path.insert(0, {HERE!r})
    import imagenet_ddp as I
    train = I.M.list_train_val({str(tmp_path / "d")!r})["train"]
    ds = I.TrainSet(train, I.get_args(["--image-size", "16"]))
    sampler = I.EpochBatches(len(train), 2, 1, 0, 1, 0)
    assert I.make_loader(ds, 2, torch.device("cpu"), I.worker_start_method(), batch_sampler=sampler).multiprocessing_context is None
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    loader = I.make_loader(ds, 1, torch.device("cpu"), I.worker_start_method(), batch_sampler=sampler)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    servers = [int(p) for p in os.listdir("/proc") if p.isdigit() and os.getpid() == int(open(f"/proc/{{p}}/stat").read()
               .rsplit(")", 1)[1].split()[1]) and b"forkserver import main" in open(f"/proc/{{p}}/cmdline", "rb").read()]
    assert len(servers) == 1, servers
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        os.kill(servers[0], sig)
    time.sleep(0.5)
    with open(f"/proc/{{servers[0]}}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] != "Z", "the forkserver died of a stop signal"
    with I.stop_signals_blocked():
        batches = list(loader)
    assert len(batches) == sampler.steps and batches[0]["image"].shape == (2, 3, 16, 16)
    torch.distributed.destroy_process_group()
    print("ok", flush=True)
"""
    (tmp_path / "rank.py").write_text(code)
    res = run_group([sys.executable, str(tmp_path / "rank.py")], timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def test_a_loader_left_running_does_not_hang_the_exit(tmp_path):
    """An error main() does not catch (a bug) can leave a loader's iterator alive at exit, held by the traceback; its
    workers ignore SIGTERM, which multiprocessing's exit handler sends before it joins them: unless main() kills them,
    the process never ends. Here a validation photo's decoding raises a bug in a worker, mid-epoch."""
    data = write_image_folder(tmp_path / "d", per_class=(4, 8), size=24)
    code = ("import sys, imagenet_ddp\n"
            "def bug(self, index):\n"
            "    raise ZeroDivisionError('a bug in evaluation')\n"
            "imagenet_ddp.EvalSet.__getitem__ = bug\n"
            f"sys.exit(imagenet_ddp.main(['--data', {str(data)!r}, '--out', {str(tmp_path / 'o')!r}, '--arch', 'resnet18', "
            "'--image-size', '16', '--epochs', '1', '--batch-size', '2', '--workers', '2', '--amp', 'off']))\n")
    res = run_group([sys.executable, "-c", code], timeout=120)
    assert res.returncode == 1 and "ZeroDivisionError: a bug in evaluation" in res.stderr, res.stderr[-2000:]


def test_only_rank_0_prints_warnings(tmp_path):
    code = ("import imagenet_ddp, warnings; imagenet_ddp.setup_distributed('cpu', 'off'); "
            "warnings.warn('a warning from a rank')")
    for rank, shown in (("0", True), ("1", False)):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                             env=child_env(RANK=rank, WORLD_SIZE="1"))
        assert res.returncode == 0 and ("a warning from a rank" in res.stderr) == shown, (rank, res.stderr)


def test_ddp_resume_refuses_other_classes_and_settings(inet_data, tmp_path, capsys, ddp_reference):
    ref_out, _ = ddp_reference
    folder = tmp_path / "o"
    folder.mkdir()
    ck = M.load_checkpoint(ref_out / "last.pt")
    M.save_checkpoint(folder / "last.pt", **dict(ck, classes=["a", "b", "c"]))
    args = ["--data", inet_data, "--out", folder, *DDP_COMMON, "--resume", "auto"]
    assert "other classes" in _ddp_error(capsys, *args, "--grad-accum", "2")
    M.save_checkpoint(folder / "last.pt", **ck)
    err = _ddp_error(capsys, *args, "--grad-accum", "1")  # 1 process x batch 4 is not the run's global batch of 8
    assert "global batch" in err and "8 (now 4)" in err
    err = _ddp_error(capsys, *args, "--batch-size", "3")  # no --grad-accum makes 8 from batches of 3
    assert "global batch of 8, which 1 process(es) x --batch-size 3 cannot make up" in err
    assert "--global-batch 6 is not a multiple of --batch-size 4 x 1 process(es) = 4" in _ddp_error(
        capsys, *args, "--global-batch", "6")
    assert "not both" in _ddp_error(capsys, *args, "--global-batch", "8", "--grad-accum", "2")
    err = _ddp_error(capsys, *args, "--grad-accum", "2", "--epochs", "3")
    assert "--epochs 2 (not 3)" in err and "global batch" not in err


def test_the_stop_vote_is_read_one_step_late_and_never_from_the_step_in_flight(monkeypatch):
    """A flag raised at step k stops the ranks after step k + 1: each cast reads only the tensor the previous cast
    voted with (on a GPU, a pinned copy behind an event), never one of the current step, so no read waits for the
    step in flight."""
    vote, read, made = imagenet_ddp.StopVote(torch.device("cpu")), [], []
    real_outcome = imagenet_ddp.StopVote._outcome
    monkeypatch.setattr(imagenet_ddp.StopVote, "_outcome", staticmethod(
        lambda v: read.append(None if v is None else id(v[0])) or real_outcome(v)))
    outcomes = []
    for step, flag in enumerate([False, False, True, False, False]):
        outcomes.append(vote.cast(flag))
        made.append(id(vote.pending[0]))
        assert read[-1] != made[-1] and (step == 0 or read[-1] == made[-2])
    assert outcomes == [False, False, False, True, False] and vote.settle() is False
