"""Every CUDA path of the four scripts, once, and one table: each path, pass or fail, and the figures README's
"not measured" GPU rows need. It makes its own tiny data; from the repository root:

    python bench/gpu_check.py              # one GPU: a few minutes; with 2+ GPUs a second part (NCCL, SyncBN, ...)
    python bench/gpu_check.py --dry-run    # the same sequence on the CPU, tiny, less the GPU-only rows

How to read it: every row should say "pass" ("skip" in a dry run for what only a GPU runs, or runs in minutes on a
CPU: fp16 is emulated there). The speed rows give img/s
of pure compute and of the real pipeline (pipeline/compute near 1.0: the input pipeline keeps up); "syncs in the
step" passes when steady-state steps of both trainers ran under torch.cuda.set_sync_debug_mode("error"); the resume
rows say whether the resumed weights equal the uninterrupted run's bit for bit (cuDNN may pick other kernels in
another process, so a GPU run may differ in the last bits: the figure says by how much). BRANCHES names, for each
function of the four scripts with a CUDA branch, the row that runs it.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = {  # row: what it runs ("GPU only": skipped by --dry-run)
    "cifar": "cifar.py: data and draws on the device, autocast, channels_last, EMA, flip TTA",
    "cifar_resume": "cifar.py: SIGTERM mid-epoch, then --resume auto (RNG states of the device)",
    "cifar_fp16": "GPU only: cifar.py --amp fp16 (GradScaler)",
    "cifar_graphs": "GPU only: cifar.py --compile reduce-overhead (CUDA graphs)",
    "cifar_autotune": "GPU only: cifar.py --compile max-autotune (CUDA graphs)",
    "cifar_128": "cifar speed, batch 128 (bench/cifar_speed.py)",
    "cifar_512": "GPU only: cifar speed, batch 512",
    "inet": "imagenet_ddp.py: workers, pinned copies on a side stream, the stop vote",
    "inet_fp16": "GPU only: imagenet_ddp.py --amp fp16 (GradScaler)",
    "inet_speed": "imagenet_ddp.py ResNet-50 speed (bench/imagenet_speed.py)",
    "syncs": "syncs in the steady-state step (both trainers)",
    "lrfind": "lrfind.py on ImageNet-style folders (pinned loader)",
    "predict": "predict.py",
    "ddp": "2 GPUs: NCCL, evaluation split over the ranks, the ranks in sync",
    "ddp_sync_bn": "GPU only: 2 GPUs --sync-bn",
    "ddp_compile": "GPU only: 2 GPUs --compile under DDP",
    "ddp_resume": "2 GPUs: a group SIGTERM, then --resume auto",
}

# Every top-level function or class of the four scripts whose code names CUDA, and the row that runs that branch
# (tests/test_bench.py fails when a script gains one that is not here).
BRANCHES = {
    ("cifar.py", "train_step"): "cifar_graphs",
    ("cifar.py", "load_resume"): "cifar_resume",
    ("cifar.py", "training_state"): "cifar_resume",
    ("cifar.py", "restore_training_state"): "cifar_resume",
    ("cifar.py", "pick_device"): "cifar",
    ("cifar.py", "pick_amp"): "cifar",
    ("imagenet_ddp.py", "start"): "inet",
    ("imagenet_ddp.py", "build_run"): "ddp",
    ("imagenet_ddp.py", "make_loader"): "inet",
    ("imagenet_ddp.py", "device_batches"): "inet",
    ("imagenet_ddp.py", "check_inputs"): "ddp_sync_bn",
    ("imagenet_ddp.py", "training_state"): "ddp_resume",
    ("imagenet_ddp.py", "load_resume"): "ddp_resume",
    ("imagenet_ddp.py", "restore_training_state"): "ddp_resume",
    ("imagenet_ddp.py", "setup_distributed"): "ddp",
    ("imagenet_ddp.py", "pick_device"): "inet",
    ("imagenet_ddp.py", "pick_amp"): "inet",
    ("imagenet_ddp.py", "StopVote"): "syncs",
    ("lrfind.py", "pick_device"): "lrfind",
    ("lrfind.py", "pick_amp"): "lrfind",
    ("lrfind.py", "LoaderBatches"): "lrfind",
    ("predict.py", "pick_device"): "predict",
    ("predict.py", "pick_amp"): "predict",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run the sequence on the CPU, tiny (the test suite does)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA GPU here (--dry-run runs the sequence on the CPU)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(tmp, args.dry_run)
        for key, fn in paths(check):
            check.row(key, fn)
    width = max(len(ROWS[k]) for k, _, _ in check.rows)
    print(f"\n{'path':<{width}}  result  figures")
    for key, result, figures in check.rows:
        print(f"{ROWS[key]:<{width}}  {result:<6}  {figures}")
    return 1 if any(result == "FAIL" for _, result, _ in check.rows) else 0


class Check:
    """The tiny data, the device flags, and the table's rows."""

    def __init__(self, tmp, dry):
        self.tmp, self.dry, self.rows = tmp, dry, []
        self.folder = write_folder(os.path.join(tmp, "cifar"), ("train", "test"), 10, (2 if dry else 26, 1), 32)
        self.inet_dir = write_folder(os.path.join(tmp, "inet"), ("train", "val"), 2, (8 if dry else 40, 2), 40)
        self.device = ["--device", "cpu" if dry else "cuda"]
        self.gpus = 2 if dry else torch.cuda.device_count()  # (the dry run takes 2 CPU processes for 2 GPUs)

    def row(self, key, fn):
        if (self.dry and ROWS[key].startswith("GPU only")) or (key.startswith("ddp") and self.gpus < 2):
            self.rows.append((key, "skip", "(--dry-run)" if self.dry else "(one GPU)"))
            return
        t0 = time.time()
        try:
            figures = fn() or ""
            self.rows.append((key, "pass", f"{figures} ({time.time() - t0:.0f} s)".strip()))
        except Exception as e:  # a failed path is a row of the table, and the sequence goes on
            self.rows.append((key, "FAIL", (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]))
        print(f"{self.rows[-1][1]:<5} {ROWS[key]}", flush=True)

    def command(self, script, *flags, torchrun=0):
        launch = [sys.executable]
        if torchrun:
            launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        return [*launch, os.path.join(ROOT, script), *map(str, flags)]

    def run(self, script, *flags, torchrun=0):
        res = subprocess.run(self.command(script, *flags, torchrun=torchrun), cwd=self.tmp, capture_output=True,
                             text=True, timeout=600)
        if res.returncode != 0:
            said = [line for line in (res.stderr + res.stdout).splitlines() if "error" in line.lower()]
            raise RuntimeError(f"{script} exit {res.returncode}: {(said or ['(no error line)'])[0][:300]}")
        return res.stdout

    def cifar_flags(self, out, *flags):
        return ["--dataset", "folder", "--data-dir", self.folder, "--epochs", "1", "--batch-size", "4" if self.dry
                else "32", "--log-every", "1", *self.device, "--out", os.path.join(self.tmp, "runs", out), *flags]

    def inet_flags(self, out, *flags):
        return ["--data", self.inet_dir, "--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size",
                "2" if self.dry else "4", "--workers", "1", "--log-every", "1", *self.device, "--out",
                os.path.join(self.tmp, "runs", out), *flags]

    def stop_then_resume(self, script, flags, whole, torchrun=0):
        """Start the run, SIGTERM its process group at step 2 (as torchrun and SLURM signal), resume it. Returns how
        far apart its final weights are from those of the same run uninterrupted (an earlier row's, in `whole`)."""
        proc = subprocess.Popen(self.command(script, *flags, torchrun=torchrun), cwd=self.tmp, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        for line in proc.stdout:
            if re.search(r"epoch 1/2 step 2/", line):
                os.killpg(proc.pid, signal.SIGTERM)
        if proc.wait(timeout=300) != 128 + signal.SIGTERM and torchrun == 0:
            raise RuntimeError(f"{script} did not stop with 128 + SIGTERM (exit {proc.returncode})")
        self.run(script, *flags, "--resume", "auto", torchrun=torchrun)
        import model as M
        out = flags[flags.index("--out") + 1]
        a, b = (M.load_checkpoint(os.path.join(o, "last.pt"))["model"]
                for o in (out, os.path.join(self.tmp, "runs", whole)))
        gap = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
        return "bit-identical to the uninterrupted run" if gap == 0 else f"max weight difference {gap:.3g}"


def paths(c):
    """The sequence: (row, what runs it)."""
    tiny = "1" if c.dry else "30"
    cifar_speed = os.path.join("bench", "cifar_speed.py")
    inet_speed = os.path.join("bench", "imagenet_speed.py")
    return [
        ("cifar", lambda: c.run("cifar.py", *c.cifar_flags("c", "--epochs", "2", "--ema", "0.9")) and ""),
        ("cifar_resume", lambda: c.stop_then_resume("cifar.py", c.cifar_flags("c-resumed", "--epochs", "2", "--ema",
                                                                               "0.9"), whole="c")),
        ("cifar_fp16", lambda: c.run("cifar.py", *c.cifar_flags("c16", "--amp", "fp16")) and ""),
        ("cifar_graphs", lambda: c.run("cifar.py", *c.cifar_flags("cg", "--compile", "reduce-overhead")) and ""),
        ("cifar_autotune", lambda: c.run("cifar.py", *c.cifar_flags("ca", "--compile", "max-autotune")) and ""),
        ("cifar_128", lambda: speed(c.run(cifar_speed, *c.cifar_flags("s", "--steps", tiny, "--batch-size",
                                                                      "4" if c.dry else "128")))),
        ("cifar_512", lambda: speed(c.run(cifar_speed, *c.cifar_flags("s", "--steps", tiny, "--batch-size", "512")))),
        ("inet", lambda: c.run("imagenet_ddp.py", *c.inet_flags("i", "--ema", "0.9")) and ""),
        ("inet_fp16", lambda: c.run("imagenet_ddp.py", *c.inet_flags("i16", "--amp", "fp16")) and ""),
        ("inet_speed", lambda: speed(c.run(inet_speed, *c.inet_flags("s", "--steps", tiny, "--arch", "resnet18" if c.dry
                                                                     else "resnet50", "--image-size", "32" if c.dry
                                                                     else "224", "--batch-size", "2" if c.dry else "64",
                                                                     "--workers", "1" if c.dry else "8")))),
        ("syncs", lambda: syncs_in_the_step(c.dry)),
        ("lrfind", lambda: c.run("lrfind.py", "--dataset", "imagenet", "--data-dir", c.inet_dir, "--image-size", "32",
                                 "--arch", "resnet18", "--num-iter", "10", "--batch-size", "2", "--workers", "1",
                                 *c.device, "--out", os.path.join(c.tmp, "lr")) and ""),
        ("predict", lambda: c.run("predict.py", os.path.join(c.folder, "test"), "--checkpoint",
                                  os.path.join(c.tmp, "runs", "c", "best.pt"), *c.device) and ""),
        ("ddp", lambda: in_sync(c.run("imagenet_ddp.py", *c.inet_flags("d2", "--epochs", "2", "--json"), torchrun=2))),
        ("ddp_sync_bn", lambda: in_sync(c.run("imagenet_ddp.py", *c.inet_flags("sb", "--sync-bn", "--json"),
                                              torchrun=2))),
        ("ddp_compile", lambda: in_sync(c.run("imagenet_ddp.py", *c.inet_flags("dc", "--compile", "--json"),
                                              torchrun=2))),
        ("ddp_resume", lambda: c.stop_then_resume("imagenet_ddp.py", c.inet_flags("d2-resumed", "--epochs", "2",
                                                                                  "--json"), whole="d2", torchrun=2)),
    ]


def write_folder(root, splits, classes, per_class, size):
    """Class folders of small random JPEG photos (pixels only: this checks code paths, not learning)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in zip(splits, per_class):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f"class{c}", f"{i:03d}.jpg"))
    return root


def speed(stdout):
    r = json.loads(stdout.strip().splitlines()[-1])
    return f"compute {r['compute_img_per_s']} img/s, pipeline {r['pipeline_img_per_s']} ({r['pipeline_vs_compute']}x)"


def in_sync(stdout):
    r = json.loads(stdout.strip().splitlines()[-1])
    if not r["weights_in_sync"]:
        raise RuntimeError("the ranks' weights differ")
    return f"world {r['world_size']}, weights in sync, val_images {r['val_images']}"


def syncs_in_the_step(dry):
    """Steady-state steps of both trainers (cifar.py's step and loss sums; imagenet_ddp.py's step, loss sums and stop
    vote) under sync debug mode "error", in which a host-device sync raises. The dry run takes the same steps on the
    CPU, where there is nothing to sync."""
    import itertools
    import cifar
    import imagenet_ddp
    import model as M
    device = torch.device("cpu" if dry else "cuda")
    amp = cifar.pick_amp("auto", device)
    run_c = cifar.build_run(cifar.get_args(["--batch-size", "8"]), 10, 50, cifar.Place(device, amp))
    x_u8 = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    sums_c = cifar.EpochSums(device)
    args_i = imagenet_ddp.get_args(["--arch", "resnet18", "--batch-size", "4", "--image-size", "32"])
    run_i = imagenet_ddp.build_run(args_i, 10, 50, imagenet_ddp.Place(0, 1, device, amp))
    batch = itertools.repeat((torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, device=device), y[:4]))
    sums_i, vote = imagenet_ddp.EpochSums(device), imagenet_ddp.StopVote(device)

    def steps(n):
        for _ in range(n):
            x = M.normalize(x_u8, (0.5,) * 3, (0.25,) * 3, True)
            sums_c.add(*cifar.train_step(run_c, x, y, 1.0), y)
            imagenet_ddp.train_step(run_i, batch, None, sums_i)
            vote.cast(False)
    steps(1 if dry else 3)  # warm-up: cuDNN's autotuning and the allocator's first blocks may sync
    if not dry:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        steps(1 if dry else 5)
    finally:
        if not dry:
            torch.cuda.set_sync_debug_mode(0)
    vote.settle()
    return "0 syncs in 5 steps" if not dry else "not measured (CPU)"


if __name__ == "__main__":
    sys.exit(main())
