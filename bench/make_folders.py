"""The two photo folders README's results use, made from their public sources:

    python bench/make_folders.py cifar10-jpg        # data/cifar-10-batches-py (cifar.py downloads it) -> data/cifar10-jpg
    python bench/make_folders.py imagenette-224     # data/imagenette2 (fastai's imagenette2.tgz, unpacked) -> data/imagenette-224

cifar10-jpg: CIFAR-10's 50,000 training and 10,000 test photos as JPEG files (quality 75, 4:2:0), train/<class>/ and
test/<class>/, with val -> test for imagenet_ddp.py. imagenette-224: Imagenette v2's 9,469 training and 3,925
validation photos (https://github.com/fastai/imagenette) re-saved at 224x224 (squashed) as JPEG quality 75.
"""
import argparse
import os
import pickle

import numpy as np
from PIL import Image


def cifar10_jpg(src="data/cifar-10-batches-py", dst="data/cifar10-jpg"):
    names = pickle.load(open(os.path.join(src, "batches.meta"), "rb"), encoding="latin1")["label_names"]
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        n = 0
        for f in files:
            d = pickle.load(open(os.path.join(src, f), "rb"), encoding="latin1")
            for row, label in zip(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), d["labels"]):
                os.makedirs(os.path.join(dst, split, names[label]), exist_ok=True)
                Image.fromarray(row.transpose(1, 2, 0)).save(os.path.join(dst, split, names[label], f"{n:05d}.jpg"), quality=75)
                n += 1
    if not os.path.lexists(os.path.join(dst, "val")):
        os.symlink("test", os.path.join(dst, "val"))


def imagenette_224(src="data/imagenette2", dst="data/imagenette-224"):
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.lower().endswith((".jpeg", ".jpg")):
                out = os.path.join(dst, os.path.relpath(dirpath, src), f)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                Image.open(os.path.join(dirpath, f)).resize((224, 224), Image.BICUBIC).save(out, quality=75)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", choices=["cifar10-jpg", "imagenette-224"])
    {"cifar10-jpg": cifar10_jpg, "imagenette-224": imagenette_224}[p.parse_args().folder]()
