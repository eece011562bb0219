"""CPU bf16: ResNet-18's 3x3 convolutions on CIFAR's tiny maps, oneDNN against model.MatmulConv2d (im2col matmuls).
Forward + backward of one conv, batch 128, channels_last, under bf16 autocast; the two take turns, median of --reps:

    python bench/matmul_conv.py --reps 10
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

SHAPES = [  # (in channels, out channels, input side, stride): layer4's convs, its stride-2 entry, and layer3's
    (512, 512, 4, 1), (256, 512, 8, 2), (256, 256, 8, 1)]


def step_ms(conv, x):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().sum().backward()
    return 1000 * (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="timed forward + backward passes of each")
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    for cin, cout, side, stride in SHAPES:
        onednn = nn.Conv2d(cin, cout, 3, stride, 1, bias=False).to(memory_format=torch.channels_last)
        matmul = M.use_matmul_conv(copy.deepcopy(onednn))
        x = torch.randn(a.batch_size, cin, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
        times = {"onednn": [], "matmul": []}
        for i in range(a.reps + 2):
            for name, conv in (("onednn", onednn), ("matmul", matmul)):
                ms = step_ms(conv, x)
                if i >= 2:  # (2 untimed rounds: oneDNN's primitive cache, the allocator)
                    times[name].append(ms)
        print(json.dumps(dict(cin=cin, cout=cout, input=side, stride=stride, output=(side - 1) // stride + 1,
                              batch=a.batch_size, onednn_ms=round(statistics.median(times["onednn"]), 1),
                              matmul_ms=round(statistics.median(times["matmul"]), 1))), flush=True)


if __name__ == "__main__":
    main()
