"""imagenet_ddp.py's CPU input pipeline against the founding article's (ImageFolder + RandomResizedCrop / flip /
ColorJitter / ToTensor / Normalize), images per second per worker, no model. Evidence for README's Speed section.

    python bench/article_imagenet.py --data data/fullsize --batch-size 64 --workers 1 --batches 40 --image-size 224

Runs the two alternately, --repeats times each, and prints one JSON line per run. Both draw the same augmentations
(area 8-100%, ratio 3/4-4/3, flip, brightness/contrast/saturation 0.4 in a random order).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imagenet_ddp  # noqa: E402


def article_set(root, size, jitter):
    import torchvision
    import torchvision.transforms as T
    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(jitter, jitter, jitter),
                    T.ToTensor(), T.Normalize(imagenet_ddp.M.IMAGENET_MEAN, imagenet_ddp.M.IMAGENET_STD)])
    return torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=tf)


def time_loader(loader, batches):
    it = iter(loader)
    next(it)  # workers started and warm
    t, images = time.time(), 0
    for _ in range(batches):
        images += len(next(it)[1])
    return images / (time.time() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    args = imagenet_ddp.get_args(["--data", a.data, "--image-size", str(a.image_size), "--batch-size", str(a.batch_size)])
    _, samples, _ = imagenet_ddp.check_data(a.data)
    n = (a.batches + 1) * a.batch_size
    order = imagenet_ddp.seeded(0, 0, 0).permutation(len(samples))[:n].tolist()
    fast = torch.utils.data.DataLoader(imagenet_ddp.TrainSet(samples, args), num_workers=a.workers,
                                       batch_sampler=[[(0, i) for i in order[b:b + a.batch_size]] for b in range(0, n, a.batch_size)])
    article = torch.utils.data.DataLoader(torch.utils.data.Subset(article_set(a.data, a.image_size, 0.4), order),
                                          batch_size=a.batch_size, num_workers=a.workers)
    for r in range(a.repeats):
        for name, loader in (("article", article), ("fast", fast)):
            rate = time_loader(loader, a.batches)
            print(json.dumps(dict(pipeline=name, repeat=r, workers=a.workers, image_size=a.image_size,
                                  img_per_s=round(rate, 1), img_per_s_per_worker=round(rate / max(a.workers, 1), 1))), flush=True)


if __name__ == "__main__":
    main()
