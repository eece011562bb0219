"""Evidence that the suite's tests can fail: break the code on purpose, run the test that should catch it, restore.
One line per mutation (CAUGHT or MISSED); about 4 minutes on a 2-core CPU. Run from the repository root:

    python bench/mutations.py            # all
    python bench/mutations.py crop       # those whose name contains "crop"
"""
import os
import subprocess
import sys
import time

os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MUTATIONS = [
    ("init is kaiming (not xavier)", "model.py", 'nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")',
     'nn.init.xavier_normal_(m.weight)', "test_init_scheme"),
    ("cifar.py model in channels_last", "cifar.py", "model = model.to(memory_format=torch.channels_last)", "model = model",
     "test_cifar_precision_and_memory_format_are_used"),
    ("predict.py normalises with the checkpoint's std", "predict.py", 'pred.pre["mean"], pred.pre["std"], channels_last)',
     'pred.pre["mean"], pred.pre["mean"], channels_last)', "test_predict_agrees_with_the_checkpoint_and_its_val_top1"),
    ("lrfind.py sweeps from the checkpoint's weights", "lrfind.py",
     'net = M.model_from_checkpoint(ck, prefer_ema=False, path=args.checkpoint)',
     'net = M.build_model(ck["arch"], ck["num_classes"], stem=ck["stem"])', "test_lrfind_script_outputs_and_leaves_checkpoint_alone"),
    ("crop aspect ratio is log-uniform", "imagenet_ddp.py", "aspect = math.exp(rng.uniform(*log_r))",
     "aspect = rng.uniform(*ratio)", "test_crop_sampler_matches_torchvision_distribution"),
    ("folder loader measures the mean", "cifar.py", "mean = tuple(round(v, 4) for v in x_tr.mean(dim=(0, 2, 3)).tolist())",
     "mean = (0.5, 0.5, 0.5)", "test_cifar_folder_loader_resizes_converts_and_measures_mean_std"),
    ("evaluation counts each image once (no padding)", "imagenet_ddp.py",
     "mine = list(range(r.rank, len(samples), r.world))",
     "mine = [i % len(samples) for i in range(r.rank, len(samples) + len(samples) % r.world, r.world)]",
     "test_ddp_evaluate_agrees_on_1_and_2_processes_and_with_the_training_figure"),
    ("DDP stop saves last.pt at the step it names", "imagenet_ddp.py",
     "                save_last(run, loop, epoch, done, sums.state())\n                return done",
     "                save_last(run, loop, epoch, done - 1, sums.state())\n                return done",
     "test_ddp_signal_to_one_rank_stops_all_at_one_step"),
    ("loader workers left at exit are killed", "imagenet_ddp.py", "\n@atexit.register  # (after", "\n# @atexit.register  # (after",
     "test_a_loader_left_running_does_not_hang_the_exit"),
]
only = sys.argv[1:]
for name, path, old, new, test in MUTATIONS:
    if only and not any(o in name for o in only):
        continue
    src = open(path).read()
    assert src.count(old) == 1, (name, src.count(old))
    open(path, "w").write(src.replace(old, new))
    try:
        t = time.time()
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"test_model.py::{test}"]
                             if "[" in test else [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_model.py", "-k", test],
                             capture_output=True, text=True, timeout=900)
        last = res.stdout.strip().splitlines()[-1]
        print(f"{'CAUGHT' if res.returncode else 'MISSED'}: {name} -> {test}: {last} ({time.time() - t:.0f}s)", flush=True)
    finally:
        open(path, "w").write(src)
