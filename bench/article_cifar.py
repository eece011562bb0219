"""cifar.py's input pipeline and training step against the founding article's recipe, on the same data and model:
torchvision dataset + PIL RandomCrop/flip/ToTensor/Normalize in a DataLoader with 2 workers, fp32, NCHW, plain SGD.
Evidence for README's Speed section, not a training feature. Prints one JSON line.

    python bench/article_cifar.py --dataset folder --data-dir data/cifar10-jpg --steps 30

Both are timed in alternating rounds of 2 steps, so that clock drift or a noisy neighbour hits both alike (the same
code swings by 2x over minutes on a shared 2-core VM). Other flags are cifar.py's (--batch-size, --amp, --arch, ...).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar  # noqa: E402
import cifar_speed  # noqa: E402 (bench/, beside this script)
import model as M  # noqa: E402


def article_recipe(args, device):
    """(make_batch, train_step) of the article's recipe as written."""
    import torchvision
    import torchvision.transforms as T
    mean, std = (cifar.CIFAR[args.dataset]["mean"], cifar.CIFAR[args.dataset]["std"]) if args.dataset != "folder" else ((0.5,) * 3, (0.25,) * 3)
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    if args.dataset == "folder":
        ds = torchvision.datasets.ImageFolder(os.path.join(args.data_dir, "train"), transform=tf)
    else:
        ds = (torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100)(args.data_dir, train=True, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=2, drop_last=True,
                                         persistent_workers=True)
    torch.manual_seed(args.seed)
    net = M.build_model(args.arch, len(ds.classes), stem="cifar").to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    it = iter(loader)

    def batch(i):
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        return x.to(device), y.to(device), 1.0

    def step(x, y, lam):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch, step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps of each")
    own, rest = p.parse_known_args()
    args = cifar.get_args(rest + ["--out", "unused"])
    data = cifar.load_data(args)
    steps_per_epoch = len(data.y_tr) // args.batch_size
    device = cifar.pick_device(args.device)
    place = cifar.Place(device, cifar.pick_amp(args.amp, device))
    run = cifar.build_run(args, len(data.classes), max(steps_per_epoch, 2 * own.steps + 10), place)
    data.x_tr, data.y_tr = data.x_tr.to(run.place.device), data.y_tr.to(run.place.device)
    order = cifar.epoch_order(args.seed, 0, len(data.y_tr)).to(run.place.device)
    draws = cifar.EpochDraws(args, 0, steps_per_epoch, run.place.device)
    contenders = {"pipeline": (lambda i: cifar.training_batch(args, data, order, draws, i % steps_per_epoch), cifar_speed.stepper(run)),
                  "article": article_recipe(args, run.place.device)}
    for make_batch, step_fn in contenders.values():
        cifar_speed.timed_steps(3, make_batch, step_fn, run.place.device)
    seconds = dict.fromkeys(contenders, 0.0)
    for r in range(own.steps // 2):
        for name, (make_batch, step_fn) in contenders.items():
            seconds[name] += cifar_speed.timed_steps(2, make_batch, step_fn, run.place.device, first=3 + 2 * r)
            if name == "article":
                # let its workers refill their queue untimed, so that they do not steal the next round's cores: this
                # flatters the article's recipe, whose data preparation is then not timed at all
                time.sleep(1.0)
    rate = {k: (own.steps // 2) * 2 * args.batch_size / s for k, s in seconds.items()}
    print(json.dumps(dict(arch=args.arch, batch_size=args.batch_size, amp=cifar.amp_name(run.place.amp_dtype),
                          steps=(own.steps // 2) * 2, pipeline_img_per_s=round(rate["pipeline"], 1),
                          article_img_per_s=round(rate["article"], 1),
                          pipeline_vs_article=round(rate["pipeline"] / rate["article"], 2))), flush=True)


if __name__ == "__main__":
    main()
