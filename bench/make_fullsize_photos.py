"""Full-size test photos for the ImageNet input-pipeline benchmark, without ImageNet: Imagenette's photos resized to
ImageNet's typical 500x375 (landscape) and saved as JPEG quality 90, as ImageNet's photos are stored.

    tar xzf ../shared/data/imagenette-224.tar.gz -C data
    python bench/make_fullsize_photos.py            # -> data/fullsize/train/<synset>/*.JPEG (200 a class), val -> train

Upscaled photos decode like real ones of that size (the decoder's work depends on the pixel count and the entropy
coding, not on where the detail came from), though they carry less fine detail than a camera's.
"""
import os

from PIL import Image

SRC, DST, PER_CLASS = os.path.join("data", "imagenette-224", "train"), os.path.join("data", "fullsize"), 200
for synset in sorted(os.listdir(SRC)):
    os.makedirs(os.path.join(DST, "train", synset), exist_ok=True)
    for name in sorted(os.listdir(os.path.join(SRC, synset)))[:PER_CLASS]:
        out = os.path.join(DST, "train", synset, name)
        if not os.path.exists(out):
            Image.open(os.path.join(SRC, synset, name)).convert("RGB").resize((500, 375), Image.BICUBIC).save(out, quality=90)
if not os.path.lexists(os.path.join(DST, "val")):
    os.symlink("train", os.path.join(DST, "val"))
print(f"{DST}: {sum(len(f) for _, _, f in os.walk(os.path.join(DST, 'train')))} photos of 500x375")
