"""Top-k predictions from a ResNet checkpoint, for image files, folders and glob patterns, or in a web page.

CPU (newest runs/**/best.pt, no flags needed):
    python predict.py samples/golden_retriever.jpg
Many images, JSON lines, a chosen checkpoint, on a GPU:
    python predict.py photos/ 'more/*.png' --checkpoint runs/cifar100-resnet18/best.pt --json --device cuda
Before any training: torchvision's ImageNet ResNet-50 weights in model.py's ResNet-50 (downloaded once, 98 MB):
    python predict.py samples/golden_retriever.jpg --pretrained
A torchvision-style state_dict (ImageNet class names come from torchvision's metadata):
    python predict.py samples/golden_retriever.jpg --checkpoint resnet50.pth --arch resnet50
The web demo (needs gradio): drop an image, see the top-5 (add --host 0.0.0.0 to reach it from other machines):
    python predict.py --serve --port 7860 --examples samples/cifar10-1k/test/cat

Checkpoints of cifar.py and imagenet_ddp.py say how they were trained (arch, stem, classes, normalisation, input
and resize sizes), and EMA weights are used when present. The pixels come from model.py's evaluation preprocessing,
the one both trainers validate with, so predictions agree with the validation accuracy a checkpoint records.
"""
import argparse
import dataclasses
import glob
import json
import os
import socket
import sys
import warnings

import torch

import model as M

# torchvision's ResNet50_Weights.IMAGENET1K_V2 (80.86% top-1): its file, the hash prefix in its name, its eval sizes
PRETRAINED = dict(url="https://download.pytorch.org/models/resnet50-11ad3fa6.pth", hash="11ad3fa6", size=224,
                  resize=232)


class UserError(Exception):
    """Bad flags, data or checkpoints: reported as one line, no traceback."""

    def __str__(self):  # (re-raised from a DataLoader worker, its text holds the worker's traceback: keep our line)
        text = super().__str__().strip()
        return text.splitlines()[-1].split("UserError: ", 1)[-1] if "\n" in text else text


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UserError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: every flag's default, and the docstring's launch commands kept as written."""


def build_parser():
    p = Parser(description="Top-k predictions for images from a ResNet checkpoint.", formatter_class=HelpFormatter,
               epilog="launch commands:\n" + __doc__.split("\n\n")[1])
    g = p.add_argument_group("data")
    g.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or glob patterns")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default=None, help="checkpoint to use (default: the newest runs/**/best.pt)")
    g.add_argument("--pretrained", action="store_true",
                   help="torchvision's ImageNet ResNet-50 weights instead (downloaded once)")
    g.add_argument("--arch", default=None, choices=list(M.ARCHS), help="architecture of a bare state_dict checkpoint")
    g.add_argument("--image-size", type=int, default=224, help="input size for a bare state_dict (ImageNet transform)")
    g = p.add_argument_group("runtime")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="inference device")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast precision; auto = the trainers' choice")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format")
    g = p.add_argument_group("output")
    g.add_argument("--topk", type=int, default=5, help="classes to show per image")
    g.add_argument("--json", action="store_true",
                   help='one JSON object per image: {"path", "top": [{"label", "index", "prob"}]}')
    g.add_argument("--serve", action="store_true", help="start the web demo (gradio) instead")
    g.add_argument("--host", default="127.0.0.1", help="address the demo listens on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=7860, help="port of the demo")
    g.add_argument("--examples", default=None, metavar="DIR",
                   help="images in DIR become clickable examples in the demo")
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.topk < 1 or args.image_size < 16:
        raise UserError("--batch-size and --topk must be >= 1, --image-size >= 16")
    if not 0 < args.port < 65536:
        raise UserError("--port must be in 1..65535")
    if not args.inputs and not args.serve:
        raise UserError("give one or more images, folders or globs (or --serve)")
    if args.pretrained and args.checkpoint:
        raise UserError("--pretrained and --checkpoint exclude each other")
    return args


# ---------------------------------------------------------------------------------------------------
# Runtime helpers (the trainers carry their own copies: each script stands alone beside model.py)
# ---------------------------------------------------------------------------------------------------
def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN time its kernels once and keep the best
    return torch.device(name)


def pick_amp(amp, device):
    """Return the autocast dtype (None = fp32). bf16 needs no loss scaling; fp16 does (GradScaler)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        # Measured: bf16 autocast trains ~3x faster than fp32 on a CPU with AMX (Sapphire Rapids), and ~15x slower
        # than fp32 on one without native bf16 (AMD EPYC, AVX2 only), where it is emulated: those stay in fp32.
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


# ---------------------------------------------------------------------------------------------------
# The model and its preprocessing
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Predictor:
    net: torch.nn.Module
    classes: list  # what people read (ImageNet synset folders become names)
    pre: dict  # model.py's evaluation preprocessing: size, resize, mean, std
    name: str  # where the weights came from
    facts: dict  # shown on the demo page: arch, val top-1, ...

    def pixels(self, image):
        return M.eval_image(image, self.pre["size"], self.pre["resize"])


def newest_best(root="runs"):
    found = glob.glob(os.path.join(root, "**", "best.pt"), recursive=True)
    if not found:
        raise UserError(f"no checkpoint given and no {root}/**/best.pt here: train one in a minute with "
                        f"`python cifar.py --dataset cifar10 --epochs 1`, pass --checkpoint PATH, or try --pretrained")
    return max(found, key=os.path.getmtime)


def load_predictor(args):
    if args.pretrained:
        return pretrained_predictor()
    path = args.checkpoint or newest_best()
    print(f"using checkpoint {path}", file=sys.stderr, flush=True)
    try:
        ck = M.load_checkpoint(path)
        if not M.is_full_checkpoint(ck):
            return bare_state_dict_predictor(ck, args, path)
        net = M.model_from_checkpoint(ck, prefer_ema=True, path=path)
    except M.CheckpointError as e:
        raise UserError(str(e)) from None
    val = ck.get("val_top1")
    facts = dict(arch=ck["arch"], trained_on=ck.get("dataset", "?"), epoch=ck.get("epoch", "?"),
                 val_top1=f"{val:.2f}%" if isinstance(val, (int, float)) else "not recorded",
                 ema=ck.get("ema") is not None)
    return Predictor(net, list(ck.get("class_names") or ck["classes"]), M.preprocessing(ck), path, facts)


def bare_state_dict_predictor(sd, args, path):
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
    classes = M.imagenet_class_names() if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]
    size = args.image_size if stem == "imagenet" else 32
    pre = dict(size=size, resize=int(size / M.CROP_RATIO) if stem == "imagenet" else None,
               mean=M.IMAGENET_MEAN, std=M.IMAGENET_STD)
    return Predictor(net, classes, pre, path, dict(arch=args.arch, val_top1="not recorded"))


def pretrained_predictor():
    """torchvision's IMAGENET1K_V2 ResNet-50 weights, loaded key for key into model.py's ResNet-50, with the weights'
    own evaluation sizes (resize 232, crop 224), ImageNet normalisation and class names."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(PRETRAINED["url"]))
    if not os.path.exists(path):
        socket.setdefaulttimeout(15)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(PRETRAINED["url"], path, hash_prefix=PRETRAINED["hash"], progress=False)
        except Exception as e:
            raise UserError(f"--pretrained cannot download {PRETRAINED['url']} ({type(e).__name__}); offline, copy "
                            f"that file to {path}") from None
    try:
        net = M.build_model("resnet50", 1000, stem="imagenet")
        net.load_state_dict(M.load_checkpoint(path), strict=True)
    except (M.CheckpointError, RuntimeError) as e:
        raise UserError(f"{path} is not torchvision's ResNet-50 state_dict: {str(e).splitlines()[0][:150]}") from None
    pre = dict(size=PRETRAINED["size"], resize=PRETRAINED["resize"], mean=M.IMAGENET_MEAN, std=M.IMAGENET_STD)
    return Predictor(net, M.imagenet_class_names(), pre, "torchvision ResNet50_Weights.IMAGENET1K_V2",
                     dict(arch="resnet50", trained_on="ImageNet-1k", val_top1="80.86% (torchvision's figure)"))


@torch.no_grad()
def predict(pred, batch, device, amp_dtype, channels_last, topk):
    x = M.normalize(torch.stack(batch).to(device), pred.pre["mean"], pred.pre["std"], channels_last)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = pred.net(x).float()
    probs = logits.softmax(1)
    return probs.topk(min(topk, probs.shape[1]), 1)


def describe(path, classes, p, i):
    top = [{"label": classes[j], "index": int(j), "prob": round(float(q), 6)} for q, j in zip(p, i)]
    return {"path": path, "top": top}


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def expand_inputs(inputs):
    """Files, folders (recursive, image extensions) and globs -> list of paths, in the order given."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, _, files in sorted(os.walk(item)):
                paths += [os.path.join(dirpath, f) for f in sorted(files) if M.is_image(f)]
        elif any(c in item for c in "*?[") and not os.path.exists(item):
            matches = sorted(glob.glob(item, recursive=True))
            paths += matches if matches else [item]  # an empty glob is reported like a missing file
        else:
            paths.append(item)
    return paths


def read_pixels(pred, path):
    """(pixels, None) or (None, the reason the file cannot be read)."""
    if not os.path.exists(path):
        return None, "no such file"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return None, "empty file"
    try:
        return pred.pixels(path), None
    except M.ImageError as e:
        return None, str(e).split(": ", 1)[-1] if str(e).startswith(path) else str(e)


def run_cli(args, pred, device, amp_dtype):
    paths = expand_inputs(args.inputs)
    if not paths:
        raise UserError("no images found in the given inputs")
    failed, batch, names = 0, [], []

    def flush():
        if batch:
            p, i = predict(pred, batch, device, amp_dtype, args.channels_last, args.topk)
            for name, pp, ii in zip(names, p.tolist(), i.tolist()):
                d = describe(name, pred.classes, pp, ii)
                print(json.dumps(d) if args.json else
                      f"{name}: " + ", ".join(f"{t['label']} ({100 * t['prob']:.1f}%)" for t in d["top"]), flush=True)
        batch.clear()
        names.clear()

    for path in paths:
        pixels, reason = read_pixels(pred, path)
        if reason:
            failed += 1
            print(f"{path}: {reason}", file=sys.stderr, flush=True)
            continue
        batch.append(pixels)
        names.append(path)
        if len(batch) == args.batch_size:
            flush()
    flush()
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------
# The web demo
# ---------------------------------------------------------------------------------------------------
def page_header(pred):
    shown = ", ".join(pred.classes[:12]) + (f", ... ({len(pred.classes)} in all)" if len(pred.classes) > 12 else "")
    f, crop = pred.facts, f"resize {pred.pre['resize']}, center crop" if pred.pre["resize"] else "the whole image"
    return (f"# ResNet from scratch\n**Model** `{pred.name}`: {f.get('arch')}, trained on {f.get('trained_on', '?')}, "
            f"validation top-1 **{f.get('val_top1')}**. **Input** {pred.pre['size']}x{pred.pre['size']} pixels "
            f"({crop}).\n\n"
            f"**Classes**: {shown}\n\nDrop an image below (or click an example): the network's five most likely "
            f"classes appear on the right. Nothing you upload is kept by this demo beyond gradio's temporary cache.")


def classify_upload(pred, path, device, amp_dtype, args):
    """(label value, preview of the pixels the network sees, status line); a bad upload gives its reason instead."""
    if path is None:
        return None, None, ""
    name = os.path.basename(path)
    pixels, reason = read_pixels(pred, path)
    if reason:
        return None, None, f"**Cannot classify `{name}`**: {reason}"
    p, i = predict(pred, [pixels], device, amp_dtype, args.channels_last, args.topk)
    label = {pred.classes[j]: float(q) for q, j in zip(p[0].tolist(), i[0].tolist())}
    return label, pixels.permute(1, 2, 0).numpy(), f"`{name}`: **{pred.classes[int(i[0, 0])]}**"


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise UserError("--serve needs gradio, which is not installed: pip install -r requirements-demo.txt") from None
    return gradio


def serve(args, pred, device, amp_dtype, gr):
    from PIL import Image
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # a public page keeps PIL's size guard, strictly
    examples = expand_inputs([args.examples]) if args.examples else []
    if args.examples and not examples:
        raise UserError(f"--examples {args.examples}: no images there")
    with gr.Blocks(title="ResNet from scratch") as page:
        gr.Markdown(page_header(pred), elem_id="model-info")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image (upload or drop)", file_types=["image"], type="filepath",
                                 elem_id="upload")
                seen = gr.Image(label="what the network sees", interactive=False, height=224, elem_id="seen")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                label = gr.Label(num_top_classes=args.topk, label="top classes", elem_id="top-classes")
        upload.change(lambda path: classify_upload(pred, path, device, amp_dtype, args), inputs=upload,
                      outputs=[label, seen, status])
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=upload, label="examples")
    print(f"demo on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    page.launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True)
    return 0


def main(argv=None):
    from PIL import Image
    try:
        args = get_args(argv)
        if not args.serve:  # very large photos are fine for a local tool (PIL's default stops at ~179 MP)
            Image.MAX_IMAGE_PIXELS = 1_000_000_000
        gr = import_gradio() if args.serve else None  # before anything slow: say at once what is missing
        device = pick_device(args.device)
        amp_dtype = pick_amp(args.amp, device)
        pred = load_predictor(args)
        pred.net = pred.net.to(device).eval()
        if args.channels_last:
            pred.net = pred.net.to(memory_format=torch.channels_last)
        return serve(args, pred, device, amp_dtype, gr) if args.serve else run_cli(args, pred, device, amp_dtype)
    except UserError as e:
        print(f"predict.py: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
