"""The smaller real data sets README's results use, as folders of symbolic links into the unpacked CIFAR-10 photos:

    mkdir -p data/cifar10-jpg && tar xzf ../shared/data/cifar10-jpg.tar.gz -C data/cifar10-jpg
    python bench/make_subsets.py            # -> data/c10-1800 (180 + 100 per class), data/c10-5k (500 + 200 per class)
"""
import os

SRC = os.path.join("data", "cifar10-jpg")
for name, per_class in (("c10-1800", {"train": 180, "test": 100}), ("c10-5k", {"train": 500, "test": 200})):
    for split, n in per_class.items():
        for c in sorted(os.listdir(os.path.join(SRC, split))):
            dst = os.path.join("data", name, split, c)
            os.makedirs(dst, exist_ok=True)
            for f in sorted(os.listdir(os.path.join(SRC, split, c)))[:n]:
                link = os.path.join(dst, f)
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(SRC, split, c, f)), link)
    print(f"data/{name}: {sum(len(fs) for _, _, fs in os.walk(os.path.join('data', name)))} photos")
