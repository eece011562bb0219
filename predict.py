"""Top-k predictions from a ResNet checkpoint, for image files, folders and glob patterns.

CPU (newest runs/**/best.pt, no flags needed):
    python predict.py img.jpg
Many images, JSON lines, a chosen checkpoint, on a GPU:
    python predict.py photos/ 'more/*.png' --checkpoint runs/cifar100-resnet18/best.pt --json --device cuda
A torchvision state_dict (ImageNet class names come from torchvision's metadata):
    python predict.py img.jpg --checkpoint resnet50.pth --arch resnet50
Small web demo (needs gradio):
    python predict.py --serve

The checkpoints of cifar.py and imagenet_ddp.py say how they were trained (arch, stem, classes,
normalisation, input size), and EMA weights are used when present. Preprocessing is the trainer's own
evaluation transform, imported from the trainer, so predictions agree with its validation accuracy.
"""
import argparse
import glob
import json
import os
import sys

import torch

import model as M
from cifar import IMAGE_EXTS, Parser, UserError, autocast, decode_32, normalize, pick_amp, pick_device
from imagenet_ddp import IMAGENET_MEAN, IMAGENET_STD, eval_transform


def get_args(argv=None):
    p = Parser(description="Top-k predictions for images from a ResNet checkpoint.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or glob patterns")
    # model
    p.add_argument("--checkpoint", default=None, help="checkpoint to use (default: the newest runs/**/best.pt)")
    p.add_argument("--arch", default=None, choices=list(M.ARCHS), help="architecture of a bare state_dict checkpoint")
    p.add_argument("--image-size", type=int, default=224, help="input size for a bare state_dict (ImageNet transform)")
    # runtime
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="inference device")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast precision; auto matches the trainers' evaluation")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format")
    # output
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--json", action="store_true", help='one JSON object per image: {"path", "top": [{"label", "index", "prob"}]}')
    p.add_argument("--serve", action="store_true", help="start a small web demo (gradio) instead")
    p.add_argument("--port", type=int, default=7860, help="port of the --serve demo")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.topk < 1:
        raise UserError("--batch-size and --topk must be >= 1")
    if not args.inputs and not args.serve:
        raise UserError("give one or more images, folders or globs (or --serve)")
    return args


def newest_best(root="runs"):
    found = glob.glob(os.path.join(root, "**", "best.pt"), recursive=True)
    if not found:
        raise UserError(f"no checkpoint given and no {root}/**/best.pt found: train one (python cifar.py) "
                        "or pass --checkpoint PATH")
    return max(found, key=os.path.getmtime)


def imagenet_categories():
    from torchvision.models import ResNet50_Weights  # metadata only: nothing is downloaded
    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def load_predictor(args):
    """Returns (model, classes, preprocess(path or PIL image) -> uint8 [3,s,s], mean, std)."""
    path = args.checkpoint or newest_best()
    print(f"using checkpoint {path}", file=sys.stderr, flush=True)
    try:
        ck = M.load_checkpoint(path)
        if M.is_full_checkpoint(ck):
            net = M.model_from_checkpoint(ck, prefer_ema=True, path=path)
            classes, mean, std, size = ck["classes"], ck["mean"], ck["std"], int(ck["image_size"])
            cifar_like = ck["stem"] == "cifar"
        else:
            net, classes = bare_state_dict_model(ck, args, path)
            mean, std, size, cifar_like = IMAGENET_MEAN, IMAGENET_STD, args.image_size, False
    except M.CheckpointError as e:
        raise UserError(str(e)) from None
    preprocess = (lambda im: torch.from_numpy(decode_32(im))) if cifar_like else (lambda im: eval_transform(im, size))
    return net, list(classes), preprocess, mean, std


def bare_state_dict_model(sd, args, path):
    """A torchvision-style state_dict (optionally with DDP's "module." or torch.compile's "_orig_mod." prefixes)."""
    for key in ("state_dict", "model"):  # common wrappers around a state_dict
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    if "fc.weight" not in sd:
        raise UserError(f"{path} is neither a training checkpoint nor a ResNet state_dict (no fc.weight)")
    if args.arch is None:
        raise UserError(f"{path} is a bare state_dict: pass --arch (e.g. --arch resnet50)")
    num_classes = sd["fc.weight"].shape[0]
    stem = "cifar" if sd.get("conv1.weight") is not None and sd["conv1.weight"].shape[-1] == 3 else "imagenet"
    net = M.build_model(args.arch, num_classes, stem=stem)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError:
        raise UserError(f"{path} does not fit {args.arch} (missing, unexpected or mis-shaped weights)") from None
    classes = imagenet_categories() if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]
    return net, classes


def expand_inputs(inputs):
    """Files, folders (recursive, image extensions) and globs -> list of paths, in the order given."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, _, files in sorted(os.walk(item)):
                paths += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
        elif any(c in item for c in "*?[") and not os.path.exists(item):
            matches = sorted(glob.glob(item, recursive=True))
            paths += matches if matches else [item]  # an empty glob is reported like a missing file
        else:
            paths.append(item)
    return paths


@torch.no_grad()
def predict(net, batch, mean, std, device, amp_dtype, channels_last, topk):
    x = normalize(torch.stack(batch).to(device), mean, std, channels_last)
    with autocast(device, amp_dtype):
        logits = net(x).float()
    probs = logits.softmax(1)
    return probs.topk(min(topk, probs.shape[1]), 1)


def describe(path, classes, p, i):
    return {"path": path, "top": [{"label": classes[j], "index": int(j), "prob": round(float(q), 6)} for q, j in zip(p, i)]}


def run(args):
    device = pick_device(args.device)
    amp_dtype = pick_amp(args.amp, device)
    net, classes, preprocess, mean, std = load_predictor(args)
    net = net.to(device).eval()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args.serve:
        return serve(args, net, classes, preprocess, mean, std, device, amp_dtype)
    paths = expand_inputs(args.inputs)
    failed = 0

    def flush(batch, names):
        if not batch:
            return
        p, i = predict(net, batch, mean, std, device, amp_dtype, args.channels_last, args.topk)
        for name, pp, ii in zip(names, p.tolist(), i.tolist()):
            d = describe(name, classes, pp, ii)
            print(json.dumps(d) if args.json else
                  f"{name}: " + ", ".join(f"{t['label']} ({100 * t['prob']:.1f}%)" for t in d["top"]), flush=True)

    batch, names = [], []
    for path in paths:
        reason = None
        if not os.path.exists(path):
            reason = "no such file"
        elif os.path.isfile(path) and os.path.getsize(path) == 0:
            reason = "empty file"
        else:
            try:
                batch.append(preprocess(path))
                names.append(path)
            except UserError as e:
                reason = str(e).split(": ", 1)[-1] if str(e).startswith(path) else str(e)
            except Exception as e:  # a decoder error the trainers' helpers did not wrap
                reason = f"cannot read image ({type(e).__name__})"
        if reason:
            failed += 1
            print(f"{path}: {reason}", file=sys.stderr, flush=True)
        if len(batch) == args.batch_size:
            flush(batch, names)
            batch, names = [], []
    flush(batch, names)
    if not paths:
        raise UserError("no images found in the given inputs")
    return 1 if failed else 0


def serve(args, net, classes, preprocess, mean, std, device, amp_dtype):
    try:
        import gradio as gr
    except ImportError:
        raise UserError("--serve needs gradio, which is not installed: pip install gradio") from None

    def classify(image):
        p, i = predict(net, [preprocess(image)], mean, std, device, amp_dtype, args.channels_last, args.topk)
        return {classes[j]: float(q) for q, j in zip(p[0].tolist(), i[0].tolist())}
    gr.Interface(fn=classify, inputs=gr.Image(type="pil"), outputs=gr.Label(num_top_classes=args.topk),
                 title="ResNet from scratch").launch(server_port=args.port)
    return 0


def main(argv=None):
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = 1_000_000_000  # very large photos are fine for a local tool (PIL's default stops at ~179 MP)
    try:
        return run(get_args(argv))
    except UserError as e:
        print(f"predict.py: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
