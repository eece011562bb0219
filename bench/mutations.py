"""Evidence that the suite's tests can fail: break the code on purpose, run the test that should catch it, restore.
One line per mutation (CAUGHT or MISSED); about 7 minutes on a 2-core CPU. Run from the repository root:

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
     "                save_last(run, loop, epoch, done, finite_sums(run, sums, epoch, done))\n                return done",
     "                save_last(run, loop, epoch, done - 1, finite_sums(run, sums, epoch, done))\n                return done",
     "test_ddp_signal_to_one_rank_stops_all_at_one_step"),
    ("loader workers left at exit are killed", "imagenet_ddp.py", "\n@atexit.register  # (after", "\n# @atexit.register  # (after",
     "test_a_loader_left_running_does_not_hang_the_exit"),
    # The founding article's pitfalls, put back one at a time (README: Tests)
    ("pitfall 1: imagenet_ddp.py's epoch order ignores the epoch", "imagenet_ddp.py",
     "order = seeded(self.seed, self.epoch, 0).permutation(self.n)", "order = seeded(self.seed, 0, 0).permutation(self.n)",
     "test_ddp_epoch_order_is_new_each_epoch_and_ranks_split_it"),
    ("pitfall 1: imagenet_ddp.py's loop never tells the sampler the epoch", "imagenet_ddp.py",
     "loop.sampler.set_epoch(epoch, start_step)", "loop.sampler.set_epoch(0, start_step)",
     "test_trainers_draw_a_new_permutation_every_epoch"),
    ("pitfall 1: the ranks take overlapping shares", "imagenet_ddp.py",
     "lo = (m * self.world + self.rank) * self.batch", "lo = m * self.world * self.batch",
     "test_ddp_epoch_order_is_new_each_epoch_and_ranks_split_it"),
    ("pitfall 1: cifar.py's epoch order ignores the epoch", "cifar.py",
     "order = epoch_order(args.seed, epoch, len(data.y_tr)).to(run.device)",
     "order = epoch_order(args.seed, 0, len(data.y_tr)).to(run.device)", "test_trainers_draw_a_new_permutation_every_epoch"),
    ("pitfall 2: imagenet_ddp.py's last.pt holds the wrapped model's keys", "imagenet_ddp.py",
     "return dict(model=run.model.state_dict(), ema=", "return dict(model=run.fwd.state_dict(), ema=",
     "test_checkpoints_of_compiled_models_load_into_a_bare_one"),
    ("pitfall 2: imagenet_ddp.py's best.pt holds the DDP-wrapped keys", "imagenet_ddp.py",
     '"best.pt"), model=run.model.state_dict()', '"best.pt"), model=run.ddp.state_dict()',
     "test_ddp_reference_run_scales_the_lr_and_saves_bare_synced_weights"),
    ("pitfall 2: cifar.py's best.pt holds the compiled model's keys", "cifar.py",
     '"best.pt"), model=run.model.state_dict()', '"best.pt"), model=run.fwd.state_dict()',
     "test_checkpoints_of_compiled_models_load_into_a_bare_one"),
    ("pitfall 3: --sync-bn converts nothing", "imagenet_ddp.py",
     "model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)", "model = model",
     "test_sync_bn_converts_every_batchnorm_and_keeps_the_checkpoint_keys"),
    ("pitfall 3: BN statistics summed, not averaged, over the ranks", "imagenet_ddp.py", "                t.div_(world)",
     "                pass", "test_bn_statistics_are_averaged_over_the_ranks"),
    ("pitfall 3: the live BN statistics are not averaged at epoch ends", "imagenet_ddp.py",
     "    all_average_([b for b in run.model.buffers()], run.world)", "    pass",
     "test_ddp_two_processes_train_in_sync_with_exact_val_count"),
    ("pitfall 4: the LR is not scaled by the number of processes", "imagenet_ddp.py",
     "peak_lr = args.lr * args.batch_size * world * args.grad_accum / 256",
     "peak_lr = args.lr * args.batch_size * args.grad_accum / 256",
     "test_ddp_reference_run_scales_the_lr_and_saves_bare_synced_weights"),
    ("pitfall 4: the LR is not scaled by --grad-accum", "imagenet_ddp.py",
     "peak_lr = args.lr * args.batch_size * world * args.grad_accum / 256", "peak_lr = args.lr * args.batch_size * world / 256",
     "test_ddp_schedules_and_scaled_lr"),
    ("pitfall 5: cifar.py's train step ignores --amp", "cifar.py", "with autocast(run.device, run.amp_dtype):\n        logits = run.fwd(x)",
     "with autocast(run.device, None):\n        logits = run.fwd(x)", "test_mixed_precision_halves_the_activation_memory"),
    ("pitfall 5: imagenet_ddp.py's train step ignores --amp", "imagenet_ddp.py",
     "with autocast(run.device, run.amp_dtype):\n                logits = run.fwd(x)",
     "with autocast(run.device, None):\n                logits = run.fwd(x)", "test_mixed_precision_halves_the_activation_memory"),
    ("fp16 without a loss scaler", "imagenet_ddp.py", "scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)",
     "scaler = torch.amp.GradScaler(device.type, enabled=False)", "test_resume_switches_precision"),
    # Beyond the article: the other silent killers of accuracy
    ("EMA decay inverted (keeps the new weights' share small)", "cifar.py",
     "torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)",
     "torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], d)",
     "test_ema_follows_its_decay_and_averages_bn_statistics"),
    ("EMA without its warm-up ramp", "imagenet_ddp.py", "d = min(self.decay, (1 + self.updates) / (10 + self.updates))",
     "d = self.decay", "test_ema_follows_its_decay_and_averages_bn_statistics"),
    ("EMA copies the live BN statistics", "cifar.py",
     "torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - d)",
     "torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0)",
     "test_ema_follows_its_decay_and_averages_bn_statistics"),
    ("EMA BN statistics left per rank", "imagenet_ddp.py", "        all_average_([b for b in run.ema.module.buffers()], run.world)",
     "        pass", "test_ddp_reference_run_scales_the_lr_and_saves_bare_synced_weights"),
    ("label smoothing applied twice", "cifar.py", "loss = F.cross_entropy(logits, y, label_smoothing=ls)",
     "loss = F.cross_entropy(logits, y, label_smoothing=1 - (1 - ls) ** 2)",
     "test_label_smoothing_is_applied_once_also_to_the_mixed_label"),
    ("label smoothing left off the mixed-in label (cifar.py)", "cifar.py",
     "F.cross_entropy(logits, y.flip(0), label_smoothing=ls)", "F.cross_entropy(logits, y.flip(0))",
     "test_label_smoothing_is_applied_once_also_to_the_mixed_label"),
    ("label smoothing left off the mixed-in label (imagenet_ddp.py)", "imagenet_ddp.py",
     "F.cross_entropy(logits, y.flip(0), label_smoothing=args.label_smoothing)", "F.cross_entropy(logits, y.flip(0))",
     "test_label_smoothing_is_applied_once_also_to_the_mixed_label"),
    ("weight decay on BN and biases (cifar.py)", "cifar.py", '{"params": no_decay, "weight_decay": 0.0}',
     '{"params": no_decay, "weight_decay": wd}', "test_weight_decay_shrinks_weights_and_leaves_bn_and_biases_alone"),
    ("weight decay on BN and biases (imagenet_ddp.py)", "imagenet_ddp.py", '{"params": no_decay, "weight_decay": 0.0}',
     '{"params": no_decay, "weight_decay": wd}', "test_weight_decay_shrinks_weights_and_leaves_bn_and_biases_alone"),
    ("BN parameters and biases left out of the optimizer", "imagenet_ddp.py",
     "no_decay = [p for p in model.parameters() if p.ndim <= 1]", "no_decay = [p for p in model.parameters() if p.ndim < 1]",
     "test_weight_decay_shrinks_weights_and_leaves_bn_and_biases_alone"),
    ("a folder run records CIFAR-100's mean and std, not its own", "cifar.py", "mean=list(data.mean), std=list(data.std),",
     'mean=list(CIFAR["cifar100"]["mean"]), std=list(CIFAR["cifar100"]["std"]),',
     "test_checkpoints_record_the_evaluation_preprocessing_validation_used"),
    ("a checkpoint records the training size as the evaluation size", "imagenet_ddp.py",
     "image_size=args.val_size, eval_resize=args.val_resize,", "image_size=args.train_size, eval_resize=args.val_resize,",
     "test_checkpoints_record_the_evaluation_preprocessing_validation_used"),
    ("validation resizes otherwise than the checkpoint records", "imagenet_ddp.py",
     "res = evaluate(net, loop.val_samples, run, args.val_size, args.val_resize)",
     "res = evaluate(net, loop.val_samples, run, args.val_size, args.val_size)",
     "test_ddp_evaluate_agrees_on_1_and_2_processes_and_with_the_training_figure"),
    ("One Cycle without its momentum cycle (cifar.py)", "cifar.py", "cycle_momentum=args.momentum > 0,\n        base_momentum",
     "cycle_momentum=False,\n        base_momentum", "test_cifar_one_cycle_schedule_values"),
    ("One Cycle momentum bounds swapped (imagenet_ddp.py)", "imagenet_ddp.py", "base_momentum=0.85, max_momentum=args.momentum)",
     "base_momentum=args.momentum, max_momentum=0.85)", "test_ddp_schedules_and_scaled_lr"),
    # The device-side flip and jitter (--augment-on device) against the workers' PIL
    ("the device skips the flip", "imagenet_ddp.py", "x = torch.where(flip[:, None, None, None], x_u8.flip(3), x_u8)", "x = x_u8",
     "test_flip_and_jitter_on_the_device_are_the_workers_pil_bit_for_bit"),
    ("the device's blend rounds where PIL truncates", "imagenet_ddp.py", ".clamp_(0, 255).floor_()", ".clamp_(0, 255).round_()",
     "test_flip_and_jitter_on_the_device_are_the_workers_pil_bit_for_bit"),
    # The faults a long job meets on its own
    ("imagenet_ddp.py's log lines do not check the loss", "imagenet_ddp.py", "    s = finite_sums(run, sums, epoch, done)\n    if run.rank == 0:",
     "    s = sums.state()\n    if run.rank == 0:", "test_an_absurd_lr_stops_each_trainer_with_one_line_and_exit_3"),
    ("cifar.py's log lines do not check the loss", "cifar.py", "s = finite_sums(run, sums, epoch, step + 1)", "s = sums.state()",
     "test_an_absurd_lr_stops_each_trainer_with_one_line_and_exit_3"),
    ("a --save-every save writes NaN weights", "imagenet_ddp.py",
     "save_last(run, loop, epoch, done, finite_sums(run, sums, epoch, done))\n        return None",
     "save_last(run, loop, epoch, done, sums.state())\n        return None", "test_a_run_that_diverges_keeps_its_last_finite_checkpoints"),
    ("a torchrun restart refuses to resume", "imagenet_ddp.py", "if args.resume is None and restarts > 0:", "if False:",
     "test_torchrun_restart_after_a_rank_is_killed_resumes_exactly_and_leaves_nothing"),
    ("a rank believes its own node's restart count", "imagenet_ddp.py",
     "        dist.all_reduce(count, op=dist.ReduceOp.MAX)\n", "        pass\n",
     "test_torchrun_restart_after_a_rank_is_killed_resumes_exactly_and_leaves_nothing"),
    ("a restarted rank takes the name the last attempt left", "imagenet_ddp.py",
     'store.check([f"{name}/echo/{rank}"]) and store.get(f"{name}/echo/{rank}") == nonce:',
     'store.check([f"{name}/echo/{rank}"]):', "test_a_restarted_rank_waits_for_its_own_rank_0_not_the_name"),
    ("loader workers outlive a killed rank", "imagenet_ddp.py", "    if rank_pid is not None:\n        exit_with(rank_pid)",
     "    pass", "test_torchrun_restart_after_a_rank_is_killed_resumes_exactly_and_leaves_nothing"),
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
