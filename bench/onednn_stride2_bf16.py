"""oneDNN's bf16 weight gradient of a 3x3 stride-2 conv against the exact one, by input size: the check behind
README's troubleshooting entry (garbage, sometimes NaN, in the taps that read padding when the input is 1x1).

    python bench/onednn_stride2_bf16.py
"""
import torch
import torch.nn as nn


def check(cin, cout, stride, side, calls=60):
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False).to(memory_format=torch.channels_last)
    nonfinite = wrong = 0
    for _ in range(calls):
        x = torch.randn(4, cin, side, side).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().sum().backward()
        g = conv.weight.grad
        exact = torch.nn.grad.conv2d_weight(x.bfloat16().float(), conv.weight.shape, torch.ones_like(y.float()),
                                            stride=stride, padding=1)
        if not torch.isfinite(g).all():
            nonfinite += 1
        elif ((g - exact).abs() > 1e-2 * exact.abs().max() + 1e-3).any():
            wrong += 1
        conv.weight.grad = None
    return nonfinite, wrong


if __name__ == "__main__":
    torch.set_num_threads(2)
    for cin, cout, stride in ((256, 512, 2), (128, 256, 2), (512, 512, 1)):
        for side in (1, 2, 4):
            nonfinite, wrong = check(cin, cout, stride, side)
            print(f"{cin}->{cout} stride {stride}, {side}x{side} input: non-finite {nonfinite}/60, wrong {wrong}/60", flush=True)
