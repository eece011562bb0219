"""imagenet_ddp.py's CPU input pipeline against the founding article's (ImageFolder + RandomResizedCrop / flip /
ColorJitter / ToTensor / Normalize), on real ImageNet photos (their own sizes and JPEG encoding), no model. Evidence
for README's input-pipeline tables and its workers-per-GPU advice.

    python bench/article_imagenet.py --data data/imagenet-sample-400 --workers 1 --batch-size 32 --rounds 6
    python bench/article_imagenet.py --data data/imagenet-sample-400 --breakdown

The timed run interleaves the pipelines round by round (these VMs drift over minutes), each round a fresh loader
whose workers are started and warm (their first batch untimed) over the same images in the same order (one epoch's
permutation), so both sides decode the same photos the same number of times. One JSON line per round, then one with
the medians and the ratio. --breakdown times each stage of one worker's work per image, in one process.
All draw the same augmentation distribution (area 8-100%, ratio 3/4-4/3, flip, brightness/contrast/saturation 0.4 in a
random order) at --image-size.
"""
import argparse
import functools
import io
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imagenet_ddp  # noqa: E402


def article_transform(size, jitter):
    import torchvision.transforms as T
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(jitter, jitter, jitter),
                      T.ToTensor(), T.Normalize(imagenet_ddp.M.IMAGENET_MEAN, imagenet_ddp.M.IMAGENET_STD)])


def loaders(a, samples):
    """The two contenders' loaders over the same images: the first whole batches of epoch 0's permutation."""
    import torchvision
    args = imagenet_ddp.get_args(["--data", a.data, "--image-size", str(a.image_size), "--batch-size", str(a.batch_size)])
    n = len(samples) // a.batch_size * a.batch_size
    order = imagenet_ddp.M.seeded(0, 0, imagenet_ddp.M.Stream.ORDER).permutation(len(samples))[:n].tolist()
    batches = [[(0, i) for i in order[b:b + a.batch_size]] for b in range(0, n, a.batch_size)]
    worker_init = functools.partial(imagenet_ddp.worker_init, rank_pid=os.getpid())
    common = dict(num_workers=a.workers, worker_init_fn=worker_init, prefetch_factor=4)
    ours = torch.utils.data.DataLoader(imagenet_ddp.TrainSet(samples, args), batch_sampler=batches, **common)
    folder = torchvision.datasets.ImageFolder(os.path.join(a.data, "train"), transform=article_transform(a.image_size, 0.4))
    article = torch.utils.data.DataLoader(torch.utils.data.Subset(folder, order), batch_size=a.batch_size, **common)
    return {"article": article, "ours": ours}


def time_loader(loader):
    it = iter(loader)
    next(it)  # workers started and warm
    t, images = time.time(), 0
    for batch in it:
        images += len(batch["label"] if isinstance(batch, dict) else batch[1])
    return images, time.time() - t


def interleaved(a, samples):
    contenders, rates = loaders(a, samples), {}
    for r in range(a.rounds):
        for name, loader in contenders.items():
            images, secs = time_loader(loader)
            rates.setdefault(name, []).append(images / secs / max(a.workers, 1))
            print(json.dumps(dict(round=r, pipeline=name, workers=a.workers, images=images, seconds=round(secs, 3),
                                  img_per_s_per_worker=round(rates[name][-1], 1))), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps(dict(summary="median img/s per worker", image_size=a.image_size, batch_size=a.batch_size,
                          workers=a.workers, rounds=a.rounds, **{k: round(v, 1) for k, v in med.items()},
                          ours_vs_article=round(med["ours"] / med["article"], 3))), flush=True)


class Clock:
    """Seconds per stage, summed over images."""

    def __init__(self):
        self.total, self.t = {}, time.perf_counter()

    def lap(self, stage):
        now = time.perf_counter()
        self.total[stage] = self.total.get(stage, 0.0) + now - self.t
        self.t = now


def breakdown_ours(train_set, samples, clock, batch_size):
    from PIL import Image, ImageEnhance
    size, items = train_set.args.image_size, []
    for index, (path, _) in enumerate(samples):
        clock.t = time.perf_counter()
        with open(path, "rb") as f:
            data = f.read()
        clock.lap("read")
        im = Image.open(io.BytesIO(data))
        W, H = im.size
        d = imagenet_ddp.draw_augmentation(train_set.args, 0, index, W, H)
        clock.lap("header + draws")
        if im.format == "JPEG":  # (model.open_rgb's reduced-size decoding, as augmented_photo() calls it)
            im.draft("RGB", (max(1, W * size // d["box"][2]), max(1, H * size // d["box"][3])))
        im.load()
        im = im if im.mode == "RGB" else im.convert("RGB")
        clock.lap("decode")
        x0, y0, w, h = d["box"]
        sx, sy = im.size[0] / W, im.size[1] / H
        im = im.resize((size, size), Image.BILINEAR, box=(x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy))
        clock.lap("crop + resize")
        if d["flip"]:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        clock.lap("flip")
        for i in d["order"]:
            im = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[i](im).enhance(float(d["factors"][i]))
        clock.lap("colour jitter")
        items.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()))
        clock.lap("to tensor")
        if len(items) == batch_size:
            ipc(items, clock)
            items = []


def breakdown_article(samples, clock, size, batch_size):
    import torchvision.transforms as T
    from PIL import Image
    crop, flip, jitter = T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4)
    to_tensor, norm = T.ToTensor(), T.Normalize(imagenet_ddp.M.IMAGENET_MEAN, imagenet_ddp.M.IMAGENET_STD)
    items = []
    for path, _ in samples:
        clock.t = time.perf_counter()
        with open(path, "rb") as f:
            data = f.read()
        clock.lap("read")
        im = Image.open(io.BytesIO(data))
        im.size
        clock.lap("header + draws")
        im = im.convert("RGB")  # (torchvision's pil_loader)
        clock.lap("decode")
        im = crop(im)
        clock.lap("crop + resize")
        im = flip(im)
        clock.lap("flip")
        im = jitter(im)
        clock.lap("colour jitter")
        items.append(norm(to_tensor(im)))
        clock.lap("to tensor")
        if len(items) == batch_size:
            ipc(items, clock)
            items = []


def ipc(items, clock):
    """What a DataLoader worker does with a batch: collate it into shared memory (and a handle goes to the trainer)."""
    clock.t = time.perf_counter()
    out = items[0].new_empty((len(items), *items[0].shape)).share_memory_()
    torch.stack(items, out=out)
    clock.lap("collate + IPC")


def breakdown(a, samples):
    args = imagenet_ddp.get_args(["--data", a.data, "--image-size", str(a.image_size)])
    train_set = imagenet_ddp.TrainSet(samples, args)
    torch.set_num_threads(1)  # (a worker's torch runs one thread)
    result = {}
    for r in range(a.rounds):
        for name, fn in (("article", lambda c: breakdown_article(samples, c, a.image_size, a.batch_size)),
                         ("ours", lambda c: breakdown_ours(train_set, samples, c, a.batch_size))):
            clock = Clock()
            fn(clock)
            for stage, secs in clock.total.items():
                result.setdefault(name, {}).setdefault(stage, []).append(1000 * secs / len(samples))
    table = {name: {stage: round(statistics.median(v), 3) for stage, v in stages.items()} for name, stages in result.items()}
    for name in table:
        table[name]["total"] = round(sum(table[name].values()), 3)
    print(json.dumps(dict(breakdown="median ms per image", images=len(samples), image_size=a.image_size, **table)), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder with train/<class>/* (and val/, which is not read)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--breakdown", action="store_true", help="per-stage times of one worker's work, in this process")
    a = p.parse_args()
    samples = imagenet_ddp.M.list_train_val(a.data)["train"]
    (breakdown if a.breakdown else interleaved)(a, samples)


if __name__ == "__main__":
    main()
