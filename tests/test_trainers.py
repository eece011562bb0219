"""Tests of trainers."""
import argparse
import copy
import itertools
import json
import os

import pytest
import torch
import torch.nn as nn

import model as M
import cifar
import imagenet_ddp
import lrfind
import predict

from conftest import build_run, CIFAR_FAST, _precision_run, assert_state_equal, free_port, write_image_folder, write_tiny_cifar


def _shares(n, batch, world, accum, epoch, seed=0):
    """Every rank's (epoch, index) items of one epoch, as EpochBatches yields them."""
    shares = []
    for rank in range(world):
        s = imagenet_ddp.EpochBatches(n, batch, world, rank, accum, seed)
        s.set_epoch(epoch)
        shares.append([item for micro in s for item in micro])
    return shares


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (4, 2)])
def test_ddp_epoch_order_is_new_each_epoch_and_ranks_split_it(world, accum):
    """Pitfall 1 (the same order every epoch, DistributedSampler without set_epoch): consecutive epochs are different
    permutations; within one, the ranks' shares are disjoint and together cover every full global batch."""
    n, batch = 50, 3
    used = n // (batch * world * accum) * batch * world * accum  # (the ragged end is dropped)
    orders = []
    for epoch in (0, 1, 2):
        shares = _shares(n, batch, world, accum, epoch)
        assert all(e == epoch for share in shares for e, _ in share)
        idx = [[i for _, i in share] for share in shares]
        assert all(len(share) == used // world for share in idx)
        flat = [i for share in idx for i in share]
        assert len(set(flat)) == used and set(flat) <= set(range(n))  # disjoint, and all distinct images
        orders.append(idx)
    assert orders[0] != orders[1] != orders[2] and orders[0] != orders[2]
    # the share of rank 0 alone already differs between epochs (what a rank trains on is not replayed)
    assert orders[0][0] != orders[1][0]


def _record_calls(monkeypatch, owner, name, record):
    real = getattr(owner, name)

    def recorded(*a, **k):
        out = real(*a, **k)
        record(a, out)
        return out
    monkeypatch.setattr(owner, name, recorded)


def test_trainers_draw_a_new_permutation_every_epoch(tmp_path, monkeypatch):
    """The order a real run trains on, in both trainers: each epoch sees every image at most once, as many as its full
    batches hold, and the next epoch another order."""
    seen = []  # cifar.py: the indices of every training batch (training_batch(args, data, order, draws, step))
    _record_calls(monkeypatch, cifar, "training_batch", lambda a, out: seen.append(a[2][a[4] * 16:(a[4] + 1) * 16].tolist()))
    epochs = []
    _record_calls(monkeypatch, cifar, "EpochDraws", lambda a, out: epochs.append(a[1]))
    data = write_tiny_cifar(tmp_path / "c", n_train=64, n_test=16)
    assert cifar.main(["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "2", "--out", str(tmp_path / "c_run"),
                       "--amp", "off", *CIFAR_FAST]) == 0
    assert epochs == [0, 1] and len(seen) == 8
    per_epoch = [[i for b in seen[e * 4:(e + 1) * 4] for i in b] for e in (0, 1)]
    assert all(sorted(p) == list(range(64)) for p in per_epoch) and per_epoch[0] != per_epoch[1]
    items = []  # imagenet_ddp.py: the (epoch, index) items the workers were asked for (--workers 0: in this process)
    _record_calls(monkeypatch, imagenet_ddp.TrainSet, "__getitem__", lambda a, out: items.append(a[1]))
    data = write_image_folder(tmp_path / "i", per_class=(8, 1), size=32)
    assert imagenet_ddp.main(["--data", str(data), "--arch", "resnet18", "--image-size", "32", "--epochs", "2",
                              "--batch-size", "4", "--workers", "0", "--amp", "off", "--out", str(tmp_path / "i_run")]) == 0
    assert len(items) == 48 and [e for e, _ in items] == [0] * 24 + [1] * 24
    per_epoch = [[i for _, i in items[e * 24:(e + 1) * 24]] for e in (0, 1)]
    assert all(sorted(p) == list(range(24)) for p in per_epoch) and per_epoch[0] != per_epoch[1]


class _CompiledStandIn(nn.Module):
    """What torch.compile returns, as far as checkpoints see it: the network under `_orig_mod` (without compiling:
    the real thing costs minutes on a CPU)."""

    def __init__(self, model, mode=None):
        super().__init__()
        self._orig_mod = model

    def forward(self, x):
        return self._orig_mod(x)


def _loads_into_a_bare_model(path):
    ck = M.load_checkpoint(path)
    for key in ("model", "ema"):
        if ck.get(key) is not None:
            assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck[key]), (path, key)
            M.build_model(ck["arch"], ck["num_classes"], stem=ck["stem"]).load_state_dict(ck[key], strict=True)
    return ck


def test_checkpoints_of_compiled_models_load_into_a_bare_one(tmp_path, monkeypatch):
    """Pitfall 2 (`module.` / `_orig_mod.` prefixes): last.pt (mid-epoch and at the end) and best.pt of a --compile
    run hold the bare network's keys, model and EMA, and load strict into a fresh model.py network. (DDP's
    `module.`: the 2-process reference run's checkpoints, in test_ddp_two_processes_train_in_sync_with_exact_val_count.)"""
    assert list(_CompiledStandIn(nn.Linear(2, 2)).state_dict()) == list(torch.compile(nn.Linear(2, 2)).state_dict())
    monkeypatch.setattr(torch, "compile", _CompiledStandIn)
    data = write_tiny_cifar(tmp_path / "c", n_train=48, n_test=16)
    out = tmp_path / "c_run"
    assert cifar.main(["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "1", "--compile", "--ema", "0.9",
                       "--amp", "off", "--out", str(out), *CIFAR_FAST]) == 0
    for f in ("last.pt", "best.pt"):
        _loads_into_a_bare_model(out / f)
    data = write_image_folder(tmp_path / "i", per_class=(8, 1), size=32)
    checked = []  # every checkpoint imagenet_ddp.py writes, loaded as soon as it is written (mid-epoch ones included)
    _record_calls(monkeypatch, M, "save_checkpoint",
                  lambda a, out: checked.append((os.path.basename(a[0]), _loads_into_a_bare_model(a[0]).get("step"))))
    assert imagenet_ddp.main(["--data", str(data), "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
                              "--batch-size", "4", "--workers", "0", "--compile", "--ema", "0.9", "--save-every", "2",
                              "--amp", "off", "--out", str(tmp_path / "i_run")]) == 0
    assert checked == [("last.pt", 2), ("last.pt", 4), ("best.pt", None), ("last.pt", 0)]


def test_sync_bn_converts_every_batchnorm_and_keeps_the_checkpoint_keys(monkeypatch):
    """--sync-bn on several processes turns every BatchNorm into SyncBatchNorm (statistics over the global batch, not
    a small per-GPU one), and the checkpoint keys stay those of a bare network. One process has nothing to sync.
    (DDP itself is left out: it accepts SyncBatchNorm on GPUs only.)"""
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids: model)
    args = imagenet_ddp.get_args(["--arch", "resnet18", "--sync-bn"])
    net = lambda a, world: imagenet_ddp.build_run(a, 3, 2, imagenet_ddp.Place(0, world, torch.device("cpu"), None)).model
    plain, synced, alone = net(imagenet_ddp.get_args(["--arch", "resnet18"]), 2), net(args, 2), net(args, 1)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert n_bn == 20 and not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in alone.modules())
    assert_state_equal(synced.state_dict(), plain.state_dict())  # same keys, same seeded init


def _all_average_worker(rank, world, port, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(rank + 1.0)
    bn.running_var.fill_(10.0 * (rank + 1))
    bn.num_batches_tracked.fill_(7)
    imagenet_ddp.all_average_(list(bn.buffers()), world)
    result[rank] = (bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked))
    torch.distributed.destroy_process_group()


def test_bn_statistics_are_averaged_over_the_ranks():
    """BN's running statistics at an epoch's end are the ranks' average (DDP keeps each rank's own between broadcasts),
    the counter untouched: what epoch_row() applies to the live and the EMA network before evaluating."""
    import torch.multiprocessing as tmp
    ctx = tmp.get_context("fork")
    result = ctx.Manager().dict()
    port = free_port()
    procs = [ctx.Process(target=_all_average_worker, args=(r, 2, port, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert dict(result) == {r: ([1.5] * 3, [15.0] * 3, 7) for r in (0, 1)}


def test_ddp_reference_run_scales_the_lr_and_saves_bare_synced_weights(ddp_reference):
    """Of the 2-process reference run: the peak LR follows the global batch (lr x 4 images x 2 processes / 256), the
    checkpoints hold the bare network (no `module.`), and the EMA's BN statistics are one over the ranks (the run
    checks that every rank holds the same live and EMA weights and exits 1 otherwise)."""
    out, stdout = ddp_reference
    last = _loads_into_a_bare_model(out / "last.pt")
    _loads_into_a_bare_model(out / "best.pt")
    assert last["scheduler"]["base_lrs"] == pytest.approx([0.05 * 4 * 2 / 256] * 2)
    assert "global batch 8, peak lr 0.0016" in stdout
    assert json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])["weights_in_sync"] is True


@pytest.mark.parametrize("module", [cifar, imagenet_ddp], ids=["cifar", "imagenet_ddp"])
def test_mixed_precision_halves_the_activation_memory(module):
    """Pitfall 5 (out of memory without mixed precision): under --amp bf16, what a training step keeps for the backward
    pass per image is at most 0.65 of fp32's (measured: 0.56 cifar.py, 0.50 imagenet_ddp.py; the weights' bf16 copies
    cancel out of the per-image difference)."""
    per_image = {}
    for amp in ("off", "bf16"):
        saved = []
        for batch in (8, 16):
            run = _precision_run(module, amp, "unused", step=False)
            params = {p.data_ptr() for p in run.model.parameters()}
            total = [0]

            def pack(t):
                if t.dtype.is_floating_point and t.data_ptr() not in params:
                    total[0] += t.numel() * t.element_size()
                return t
            x_u8, y = torch.randint(0, 255, (batch, 3, 32, 32), dtype=torch.uint8), torch.arange(batch) % 3
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if module is cifar:
                    cifar.train_step(run, M.normalize(x_u8, (0.5,) * 3, (0.25,) * 3, True), y, 1.0)
                else:
                    imagenet_ddp.train_step(run, itertools.repeat((x_u8, y)), None, imagenet_ddp.EpochSums(run.place.device))
            saved.append(total[0])
        per_image[amp] = (saved[1] - saved[0]) / 8
    assert per_image["bf16"] < 0.65 * per_image["off"], per_image


@pytest.mark.parametrize("module", [cifar, imagenet_ddp], ids=["cifar", "imagenet_ddp"])
def test_ema_follows_its_decay_and_averages_bn_statistics(module):
    """The EMA is (1+n)/(10+n)-ramped Polyak averaging of the parameters *and* of BN's running statistics (a copy of
    the live statistics would not match the averaged weights), with BN's counter copied."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = M.EMA(net, 0.9)
    ref = {k: v.clone().double() for k, v in net.state_dict().items()}
    for n in range(1, 31):
        with torch.no_grad():
            for v in net.state_dict().values():
                v.copy_(torch.randint(0, 100, v.shape) if not v.dtype.is_floating_point else torch.randn(v.shape) * 3)
        ema.update(net)
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in net.state_dict().items():
            ref[k] = v.double() if not v.dtype.is_floating_point else d * ref[k] + (1 - d) * v.double()
    assert ema.updates == 30
    got = ema.state_dict()
    for k, v in ref.items():
        if got[k].dtype.is_floating_point:
            assert torch.allclose(got[k].double(), v, rtol=1e-5, atol=1e-6), k
        else:
            assert torch.equal(got[k].long(), v.long()), k  # num_batches_tracked


def _soft_target_loss(logits, y, lam, smoothing):
    """Cross-entropy against the mixed target lam * smooth(y) + (1 - lam) * smooth(y mirrored), label smoothing applied
    once to each label (Szegedy et al. 2016), written out without F.cross_entropy's own label_smoothing."""
    k = logits.shape[1]
    smooth = lambda labels: nn.functional.one_hot(labels, k).double() * (1 - smoothing) + smoothing / k
    target = lam * smooth(y) + (1 - lam) * smooth(y.flip(0))
    return -(target * logits.double().log_softmax(1)).sum(1).mean().item()


@pytest.mark.parametrize("module", [cifar, imagenet_ddp], ids=["cifar", "imagenet_ddp"])
def test_label_smoothing_is_applied_once_also_to_the_mixed_label(module):
    """The training loss, plain and under MixUp, is the cross-entropy with each label smoothed exactly once."""
    x_u8, y = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 1])
    for lam in (1.0, 0.3):
        mix = None if lam == 1.0 else ("mixup", lam, None)
        if module is cifar:
            run = build_run(cifar, cifar.get_args(["--amp", "off", "--label-smoothing", "0.2", "--out", "unused"]), 3, 20)
            x = cifar.mix_batch(M.normalize(x_u8, (0.5,) * 3, (0.25,) * 3, True), mix)[0]
            loss, logits = cifar.train_step(run, x, y, lam)
            loss = loss.item()
        else:
            args = imagenet_ddp.get_args(["--amp", "off", "--arch", "resnet18", "--batch-size", "6", "--label-smoothing", "0.2"])
            run = build_run(imagenet_ddp, args, 3, 20)
            before, sums = copy.deepcopy(run.model), imagenet_ddp.EpochSums(run.place.device)
            imagenet_ddp.train_step(run, itertools.repeat((x_u8, y)), mix, sums)
            with torch.no_grad():  # (train mode, as in the step: the same batch statistics, the same logits)
                logits = before(imagenet_ddp.mix_batch(M.normalize(x_u8, M.IMAGENET_MEAN, M.IMAGENET_STD, True), mix)[0])
            loss = sums.local_loss.item() / 6
        assert loss == pytest.approx(_soft_target_loss(logits, y, lam, 0.2), rel=1e-5), lam


@pytest.mark.parametrize("module", [cifar, imagenet_ddp], ids=["cifar", "imagenet_ddp"])
def test_weight_decay_shrinks_weights_and_leaves_bn_and_biases_alone(module):
    """With zero gradients, one optimizer step shrinks every conv and linear weight by (1 - lr x wd) and leaves BN's
    weights and biases and the classifier's bias exactly as they were (decaying them only fights normalisation)."""
    if module is cifar:
        run = build_run(cifar, cifar.get_args(["--amp", "off", "--wd", "0.1", "--out", "unused"]), 10, 100)
    else:
        run = build_run(imagenet_ddp, imagenet_ddp.get_args(["--amp", "off", "--arch", "resnet18", "--wd", "0.1"]), 10, 100)
    in_groups = [id(p) for g in run.opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in run.model.parameters())  # each parameter trained, once
    before = {k: p.detach().clone() for k, p in run.model.named_parameters()}
    for p in run.model.parameters():
        p.grad = torch.zeros_like(p)
    lr = run.opt.param_groups[0]["lr"]
    run.opt.step()
    kinds = set()
    for k, p in run.model.named_parameters():
        if p.ndim > 1:
            kinds.add("weight")
            assert torch.allclose(p.detach(), before[k] * (1 - lr * 0.1), rtol=1e-6, atol=1e-9) and not torch.equal(p, before[k]), k
        else:
            kinds.add("bn" if ".bn" in k or k.startswith("bn") or "downsample.1" in k else "bias")
            assert torch.equal(p.detach(), before[k]), k
    assert kinds == {"weight", "bn", "bias"}


def test_checkpoints_record_the_evaluation_preprocessing_validation_used(tmp_path):
    """What predict.py reads back from a checkpoint is what validation applied: cifar.py's folder data keeps its
    measured mean and std (not CIFAR's), imagenet_ddp.py its validation size and resize (not the training size)."""
    data = write_image_folder(tmp_path / "c", splits=("train", "test"), per_class=(6, 2), size=48, fmt="PNG")
    args = cifar.get_args(["--dataset", "folder", "--data-dir", str(data)])
    d = cifar.load_data(args)
    pre = M.preprocessing(cifar.rebuild_info(args, d))
    assert pre == dict(size=32, resize=None, mean=tuple(d.mean), std=tuple(d.std))
    assert pre["mean"] not in (cifar.CIFAR["cifar10"]["mean"], cifar.CIFAR["cifar100"]["mean"])
    _, test = M.list_image_folder(str(data / "test"))
    assert torch.equal(d.x_te[3], M.eval_image(test[3][0], pre["size"], pre["resize"]))
    args = imagenet_ddp.get_args(["--data", str(data), "--train-size", "32", "--val-size", "40", "--val-resize", "50"])
    pre = M.preprocessing(imagenet_ddp.rebuild_info(args, ["a", "b", "c"]))
    assert pre == dict(size=40, resize=50, mean=M.IMAGENET_MEAN, std=M.IMAGENET_STD)
    x, _ = imagenet_ddp.EvalSet(test, args.val_size, args.val_resize)[3]
    assert torch.equal(x, M.eval_image(test[3][0], pre["size"], pre["resize"]))


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch, native):
    """torch.cuda.is_bf16_supported() counts emulated bf16 by default (V100, T4), where fp16 with a loss scaler is
    the fast choice: --amp auto asks for native support, in every script's copy."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    for module in (cifar, imagenet_ddp, lrfind, predict):
        got = module.pick_amp("auto", torch.device("cuda"))
        assert got == (torch.bfloat16 if native else torch.float16), module.__name__


def test_compile_modes_that_capture_cuda_graphs_are_prepared_for_or_refused(monkeypatch, tmp_path):
    """cifar.py marks each step's start for both modes that capture CUDA graphs (max-autotune does too), and
    imagenet_ddp.py offers no mode with CUDA graphs: they break under DDP (pytorch/pytorch#140395)."""
    import argparse
    import dataclasses
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    run = build_run(cifar, cifar.get_args(["--out", str(tmp_path), "--amp", "off"]), 3, 20)
    x = M.normalize(torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3, True)
    for mode, expected in ((None, 0), ("default", 0), ("reduce-overhead", 1), ("max-autotune", 2)):
        args = argparse.Namespace(**dict(vars(run.args), compile=mode))
        cifar.train_step(dataclasses.replace(run, args=args), x, torch.tensor([0, 1, 2, 0]), 1.0)
        assert len(marks) == expected, mode
    with pytest.raises(imagenet_ddp.UserError, match="invalid choice"):
        imagenet_ddp.get_args(["--compile", "max-autotune"])
    assert imagenet_ddp.get_args(["--compile", "max-autotune-no-cudagraphs"]).compile == "max-autotune-no-cudagraphs"


class FrozenArgs(argparse.Namespace):
    """get_args' namespace, read-only once get_args has returned it."""

    def __setattr__(self, name, value):
        raise AssertionError(f"args.{name} written after get_args returned")


def test_nothing_writes_args_after_get_args(tmp_path, monkeypatch, inet_data):
    """State flows one way: each trainer's args are read-only once parsed (a decision, such as the --grad-accum a resume
    derives or the --resume auto a torchrun restart implies, is returned, not written back). Both trainers run a
    fresh start, a resume and, for imagenet_ddp.py, a torchrun restart, --global-batch and --evaluate, with args frozen."""
    for module in (cifar, imagenet_ddp):
        def frozen(argv=None, parse=module.get_args):
            args = FrozenArgs()
            args.__dict__.update(vars(parse(argv)))
            return args
        monkeypatch.setattr(module, "get_args", frozen)
    data = write_tiny_cifar(tmp_path / "c", n_train=64, n_test=16)
    base = ["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "1", "--out", str(tmp_path / "co"), *CIFAR_FAST]
    assert cifar.main(base) == 0 and cifar.main(base + ["--resume", "auto"]) == 0
    base = ["--data", str(inet_data), "--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--workers", "1", "--out", str(tmp_path / "io")]
    assert imagenet_ddp.main(base + ["--global-batch", "8"]) == 0
    assert imagenet_ddp.main(base + ["--resume", "auto"]) == 0  # (the checkpoint's global batch: --grad-accum 2)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert imagenet_ddp.main(base) == 0  # (--resume auto, implied)
    assert imagenet_ddp.main(base + ["--evaluate", "--resume", "auto"]) == 0
