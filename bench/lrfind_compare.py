"""Evidence for lrfind.py's default rule (README, "LR range test"): on several real data sets and batch sizes, sweep
with lrfind.py, then train short One Cycle runs at every rule's LR (and a few multiples), and record the accuracy.

    python bench/lrfind_compare.py            # all configurations, appends to bench/results/lrfind_compare.jsonl
    python bench/lrfind_compare.py --only c10-1800

Needs the data sets README's "Results" section names (links made by bench/make_subsets.py). Resumable: a configuration
or run already in the results file is skipped. CPU hours: about 3 on a 2-core AMD EPYC VM.
"""
import argparse
import csv
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(HERE, "bench", "results", "lrfind_compare.jsonl")
# name, lrfind data flags, trainer, epochs of the short run, batch sizes
CONFIGS = [
    ("c10-1800", ["--dataset", "folder", "--data-dir", "data/c10-1800"], "cifar", 3, (64, 128)),
    ("imagenette-64", ["--dataset", "imagenet", "--data-dir", "data/imagenette-224", "--image-size", "64"], "imagenet", 2, (64,)),
    ("c10-5k", ["--dataset", "folder", "--data-dir", "data/c10-5k"], "cifar", 2, (128,)),
]


def run_json(cmd):
    print("+", " ".join(cmd), flush=True)
    res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=HERE)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])


def train_command(name, data_flags, trainer, epochs, bs, lr):
    out = os.path.join("runs", "lrfind-compare", f"{name}-b{bs}-lr{lr:.4g}")
    if trainer == "cifar":
        return ["cifar.py", *data_flags, "--epochs", str(epochs), "--batch-size", str(bs), "--lr", f"{lr:.4g}",
                "--out", out, "--json", "--resume", "auto"]
    size = data_flags[data_flags.index("--image-size") + 1]
    return ["imagenet_ddp.py", "--data", data_flags[data_flags.index("--data-dir") + 1], "--arch", "resnet18",
            "--image-size", size, "--epochs", str(epochs), "--batch-size", str(bs), "--lr", f"{lr * 256 / bs:.4g}",
            "--schedule", "onecycle", "--workers", "2", "--out", out, "--json", "--resume", "auto"]


def rules_of(name, bs):
    """Every rule's LR, recomputed from the sweep's CSV with the current lrfind.suggestions()."""
    sys.path.insert(0, HERE)
    import lrfind
    with open(os.path.join(HERE, "runs", "lrfind-compare", f"sweep-{name}-b{bs}", "lrfind.csv")) as f:
        rows = list(csv.reader(f))[1:]
    return lrfind.suggestions([(float(r[0]), float(r[1])) for r in rows], lrfind.get_args([]).smooth)


def lrs_to_try(sug):
    """The default rule's LR with 0.1x and 10x of it first (the issue's done criterion), then the other rules' LRs;
    distinct within 10%."""
    sys.path.insert(0, HERE)
    import lrfind
    d = sug[lrfind.DEFAULT_RULE]
    wanted = [d, d / 10, 10 * d] + [sug[k] for k in ("edge", "min", "min_div10", "valley", "steepest")]
    out = []
    for lr in wanted:
        if all(abs(lr / o - 1) >= 0.1 for o in out):
            out.append(lr)
    return out


def table(done):
    """README's table: per configuration, the default rule's LR and the short run's top-1 there, at 0.1x and 10x of
    it, then the other rules' (each read off the run within 10% of its LR)."""
    sys.path.insert(0, HERE)
    import lrfind
    d = lrfind.DEFAULT_RULE
    others = [r for r in ("edge", "min", "min_div10", "valley", "steepest") if r != d]
    print(f"| data set, batch, short run | {d} (default) | 0.1x | 10x | " + " | ".join(others) + " |")
    print("| --- " * (len(others) + 4) + "|")
    for name, _, _, epochs, batch_sizes in CONFIGS:
        for bs in batch_sizes:
            runs = [r for r in done if r["kind"] == "train" and r["data"] == name and r["batch_size"] == bs]
            if not runs:
                continue
            sug = rules_of(name, bs)
            at = lambda lr: next((f"{r['val_top1']:.1f}" for r in runs if abs(r["lr"] / lr - 1) < 0.1), "not run")
            cells = [f"{f * sug[d]:.2g}: {at(f * sug[d])}" for f in (1, 0.1, 10)] + [f"{sug[k]:.2g}: {at(sug[k])}" for k in others]
            print(f"| {name}, {bs}, {epochs} epochs | " + " | ".join(cells) + " |")


def figure():
    sys.path.insert(0, HERE)
    import lrfind
    sweep = os.path.join(HERE, "runs", "lrfind-compare", "sweep-c10-1800-b64")
    with open(os.path.join(sweep, "lrfind.csv")) as f:
        records = [(float(r[0]), float(r[1])) for r in list(csv.reader(f))[1:]]
    with open(os.path.join(sweep, "lrfind.json")) as f:
        result = json.load(f)
    smooth = lrfind.get_args([]).smooth
    sug = lrfind.suggestions(records, smooth)
    result.update(sug, suggested_lr=sug[lrfind.DEFAULT_RULE], suggested_by=lrfind.DEFAULT_RULE)
    out = os.path.join(HERE, "runs", "lrfind-compare", "figure")
    lrfind.write_outputs(out, records, result, smooth)
    os.replace(os.path.join(out, "lrfind.png"), os.path.join(HERE, "bench", "figures", "lrfind.png"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=None)
    p.add_argument("--table", action="store_true", help="print README's table from the results and exit")
    p.add_argument("--figure", action="store_true",
                   help="redraw README's bench/figures/lrfind.png from the c10-1800 batch-64 sweep (lrfind.py's own plot)")
    args = p.parse_args()
    if args.figure:
        return figure()
    done = []
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            done = [json.loads(l) for l in f if l.strip()]
    if args.table:
        return table(done)
    # first the default rule's three LRs on every configuration (the done criterion), then the other rules' LRs
    for first, rest in ((0, 3), (3, None)):
        for name, data_flags, trainer, epochs, batch_sizes in CONFIGS:
            if not args.only or args.only == name:
                run_configuration(done, name, data_flags, trainer, epochs, batch_sizes, slice(first, rest))


def run_configuration(done, name, data_flags, trainer, epochs, batch_sizes, which):
    """One data set's sweeps (run once) and the short runs at the LRs `which` picks from lrs_to_try()."""
    for bs in batch_sizes:
        sweep = next((r for r in done if r["kind"] == "sweep" and r["data"] == name and r["batch_size"] == bs), None)
        if sweep is None:
            sug = run_json(["lrfind.py", *data_flags, "--batch-size", str(bs), "--workers", "2", "--json",
                            "--out", os.path.join("runs", "lrfind-compare", f"sweep-{name}-b{bs}")])
            sweep = dict(kind="sweep", data=name, batch_size=bs, **sug)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(sweep) + "\n")
        for lr in lrs_to_try(rules_of(name, bs))[which]:
            if any(r["kind"] == "train" and r["data"] == name and r["batch_size"] == bs and abs(r["lr"] / lr - 1) < 0.1
                   for r in done):  # (a run within 10% of this LR already tells its accuracy)
                continue
            cmd = train_command(name, data_flags, trainer, epochs, bs, lr)
            res = run_json(cmd)
            row = dict(kind="train", data=name, batch_size=bs, lr=lr, epochs=epochs, val_top1=res["val_top1"],
                       val_loss=res["val_loss"], command="python " + " ".join(cmd))
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)


if __name__ == "__main__":
    main()
