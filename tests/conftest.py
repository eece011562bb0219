"""Shared helpers and fixtures of the test suite (`python -m pytest -q` from the repository root).

Subprocess tests take the paths users and launchers take: scripts started as `python script.py ...` or under torchrun,
signals sent to process groups, commands copied from the docstrings and README. Every child process is started in its
own session and its whole group is killed when a test ends, so a failing test never leaves torchrun behind.
"""
import itertools
import json
import math
import os
import pickle
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import model as M
import cifar
import imagenet_ddp


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, where the scripts are
if HERE not in sys.path:
    sys.path.insert(0, HERE)


if sys.__stdin__ is None:  # run with standard input closed (some CI runners): pytest's capture and IPython (which
    sys.__stdin__ = open(os.devnull)  # gradio imports) read sys.__stdin__'s encoding, so give it an empty one


SCRIPTS = ("cifar.py", "imagenet_ddp.py", "lrfind.py", "predict.py")


torch.set_num_threads(min(2, torch.get_num_threads()))


def toy_images(n, num_classes, seed=0, size=32):
    """Learnable toy images: each class has its own colour, plus noise. Returns uint8 [n,3,s,s], labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    palette = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))  # same colours in every split
    x = palette[labels][:, :, None, None] + rng.normal(0, 20, size=(n, 3, size, size))
    return np.clip(x, 0, 255).astype(np.uint8), labels


def write_tiny_cifar(root, name="cifar10", n_train=128, n_test=40, seed=0):
    """The official python-version layout (pickled dicts of 3072-byte rows), readable by cifar.py."""
    ncls = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    xtr, ytr = toy_images(n_train, ncls, seed)
    xte, yte = toy_images(n_test, ncls, seed + 1)
    if name == "cifar10":
        chunks = np.array_split(np.arange(n_train), 5)
        parts = [(f"data_batch_{i + 1}", xtr[c], ytr[c]) for i, c in enumerate(chunks)] + [("test_batch", xte, yte)]
        meta = ("batches.meta", {"label_names": [f"class{i}" for i in range(ncls)]})
    else:
        parts = [("train", xtr, ytr), ("test", xte, yte)]
        meta = ("meta", {"fine_label_names": [f"class{i}" for i in range(ncls)]})
    for fname, x, y in parts:
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1), label_key: [int(v) for v in y]}, f)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    return root


def write_image_folder(root, splits=("train", "val"), per_class=(6, 3), classes=("cat", "dog", "fox"), size=40,
                       fmt="JPEG", seed=0):
    from PIL import Image
    for split, n in zip(splits, per_class):
        x, y = toy_images(n * len(classes), len(classes), seed + len(split), size)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / classes[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)
    return root


def write_png_bomb(path, side=30000):
    """A tiny PNG whose header claims side x side pixels: PIL's decompression-bomb guard must refuse it at open."""
    import struct
    import zlib
    from PIL import Image
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def child_env(cmd=(), **extra):
    """A child's environment: the user's, unbuffered. imagenet_ddp.py and torchrun take a thread a process (as torchrun
    gives 2 ranks on 2 cores): 1-process runs are compared bit for bit with 2-process ones, and oneDNN's sums depend on
    the thread count. cifar.py, lrfind.py, predict.py and a bench script take the cores a user's run takes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if any(s in str(c) for c in cmd for s in ("imagenet_ddp", "torch.distributed.run")):
        env["OMP_NUM_THREADS"] = "1"
    return dict(env, **extra)


def descendants(pid):
    """Every live process below pid, read from /proc (children first found, then theirs)."""
    parent = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            pass
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        found += frontier
    return found


def kill_tree(pid):
    """SIGKILL pid's process group and every descendant's: torchrun starts each rank in a session of its own, so
    killing torchrun's group alone would leave the ranks (and their loader workers) running, holding our pipes."""
    for p in [pid] + descendants(pid):
        for kill in (os.killpg, os.kill):
            try:
                kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def run_group(cmd, timeout=600, cwd=HERE, env=None, **kw):
    """subprocess.run in a process group of its own, killed whole at the end: a timed-out torchrun must not leave
    its ranks and their loader workers behind (they would outlive the test, and the suite)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env or child_env(cmd), start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-3000:]}") from None
    finally:
        kill_tree(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_script(script, *args, timeout=600, cwd=HERE, env=None):
    return run_group([sys.executable, os.path.join(HERE, script), *map(str, args)], timeout, cwd, env)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


class Child:
    """A child process in its own session (its own process group), with its output read by a thread, so that a
    wait for a line times out for real."""

    def __init__(self, cmd, cwd=HERE, env=None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                     env=env or child_env(cmd), start_new_session=True)
        self.lines, self.q = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, pattern, timeout=240):
        """Lines up to the first matching the regex; AssertionError (with the output so far) after `timeout` s."""
        deadline = time.time() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                raise AssertionError(f"{pattern!r} not printed within {timeout}s:\n{''.join(self.lines)[-4000:]}") from None
            if line is None:
                raise AssertionError(f"{pattern!r} never printed (exit {self.proc.wait()}):\n{''.join(self.lines)[-4000:]}")
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def finish(self, timeout=240):
        rc = self.proc.wait(timeout=timeout)
        while True:
            line = self.q.get(timeout=10)
            if line is None:
                break
            self.lines.append(line)
        return rc, "".join(self.lines)

    def signal_group(self, sig):
        os.killpg(self.proc.pid, sig)

    def kill(self):
        """The whole group and every descendant's, even after the leader has exited (a rank or a loader worker may
        be left)."""
        kill_tree(self.proc.pid)
        self.proc.wait()


TEST_LIMIT_S = int(os.environ.get("TEST_LIMIT_S", 900))


def _over_time(signum, frame):
    raise TimeoutError(f"over {TEST_LIMIT_S} s in one test (its module fixtures included): a hang, not a slow test")


@pytest.fixture(autouse=True)
def time_limit():
    """A hang fails its test instead of eating CI's 90 minutes. The alarm is re-armed when a test starts and again
    when it ends, so the next test's module fixtures (a torchrun reference run) run under it too."""
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(TEST_LIMIT_S)


signal.signal(signal.SIGALRM, _over_time)


signal.alarm(TEST_LIMIT_S)


@pytest.fixture
def children():
    """Start children with children(cmd); whatever happens, their process groups are killed at the end."""
    started = []

    def start(cmd, **kw):
        started.append(Child(cmd, **kw))
        return started[-1]
    yield start
    for c in started:
        c.kill()


def assert_state_equal(a, b):
    """Bit-for-bit equality of two nested structures of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_equal(x, y)
    else:
        assert a == b


def cpu_place(module, args):
    """Where a test's run lives: one process (imagenet_ddp: rank 0 of 1) on the CPU, at args.amp's precision."""
    cpu = torch.device("cpu")
    if module.__name__ == "imagenet_ddp":
        return module.Place(0, 1, cpu, module.pick_amp(args.amp, cpu))
    return module.Place(cpu, module.pick_amp(args.amp, cpu))


def build_run(module, args, num_classes, steps):
    """module.build_run (cifar or imagenet_ddp) for one CPU process."""
    if module.__name__ == "imagenet_ddp":
        return module.build_run(args, num_classes, steps, cpu_place(module, args), module.grad_accum(args, 1, None))
    return module.build_run(args, num_classes, steps, cpu_place(module, args))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_evil_checkpoint(path, marker):
    torch.save({"model": {}, "payload": _Evil(str(marker))}, path)


CIFAR_FAST = ["--batch-size", "16", "--log-every", "1", "--workers", "1"]


def one_cycle_reference(step, total, peak, div, final_div, warm_frac, anneal, mom_max, mom_min):
    """OneCycleLR's documented formula (Smith & Topin), written out independently: LR and momentum at a step."""
    warm = warm_frac * total - 1
    shape = (lambda a, b, t: b + (a - b) / 2 * (1 + math.cos(math.pi * t))) if anneal == "cos" else (lambda a, b, t: a + (b - a) * t)
    start, end = peak / div, peak / div / final_div
    if step <= warm:
        t = step / warm
        return shape(start, peak, t), shape(mom_max, mom_min, t)
    t = (step - warm) / (total - 1 - warm)
    return shape(peak, end, t), shape(mom_min, mom_max, t)


def torchrun_cmd(nproc, *args, nnodes=1, node_rank=0, port=None, script="imagenet_ddp.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
    return cmd + [f"--nproc_per_node={nproc}", os.path.join(HERE, script), *map(str, args)]


def torchrun(nproc, *args, **kw):
    res = run_group(torchrun_cmd(nproc, *args, **kw))
    assert "terminate called" not in res.stderr, res.stderr[-3000:]  # a rank's C++ abort, even in a run that failed
    return res


@pytest.fixture(scope="session")
def inet_data(tmp_path_factory):
    # 3 classes x 32 train images; 3 x 3 = 9 val images: not divisible by world size x batch size (2 x 4)
    root = tmp_path_factory.mktemp("inet")
    return write_image_folder(root, per_class=(32, 3), size=40)


# 12 steps per epoch at a global batch of 8; the training size rises from 32 to 48 px between the two epochs
DDP_COMMON = ["--arch", "resnet18", "--image-size", "32", "--train-size", "48", "--min-train-size", "32",
              "--ramp-epochs", "0", "1", "--epochs", "2", "--batch-size", "4", "--workers", "2", "--lr", "0.05",
              "--ema", "0.9", "--mixup", "0.2", "--cutmix", "1.0", "--log-every", "1", "--json", "--save-every", "0"]


@pytest.fixture(scope="session")
def ddp_reference(inet_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_ref")
    res = torchrun(2, "--data", inet_data, "--out", out, *DDP_COMMON)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res.stdout


def _precision_run(module, amp, tmp_path, step=True):
    """A Run of either trainer with the given --amp, after one training step on a tiny batch (or none: as resumed)."""
    if module is cifar:
        run = build_run(cifar, cifar.get_args(["--amp", amp, "--out", str(tmp_path), "--arch", "resnet18"]), 3, 20)
        if not step:
            return run
        x = M.normalize(torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3, True)
        cifar.train_step(run, x, torch.tensor([0, 1, 2, 0]), 1.0)
    else:
        args = imagenet_ddp.get_args(["--amp", amp, "--arch", "resnet18", "--batch-size", "4"])
        run = build_run(imagenet_ddp, args, 3, 20)
        if not step:
            return run
        batch = (torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
        imagenet_ddp.train_step(run, itertools.repeat(batch), None, imagenet_ddp.EpochSums(run.place.device))
    return run


@pytest.fixture(scope="session")
def cifar_run(tmp_path_factory):
    """A 1-epoch cifar.py run on a folder of lossless 32x32 PNGs."""
    root = tmp_path_factory.mktemp("pred")
    data = write_image_folder(root / "data", splits=("train", "test"), per_class=(32, 10), size=32, fmt="PNG")
    res = run_script("cifar.py", "--dataset", "folder", "--data-dir", data, "--epochs", "1", "--batch-size", "16",
                     "--lr", "0.01", "--ema", "0.5", "--out", root / "run")
    assert res.returncode == 0, res.stderr
    return root, data
