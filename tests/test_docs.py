"""Every launch command of README.md, bench/README.md and the scripts' docstrings runs as written (on tiny data,
briefly), in a folder holding what a fresh clone holds."""
import ast
import json
import os
import re
import shlex
import shutil
import sys
import time

import pytest
import torch

import cifar
import imagenet_ddp

from conftest import HERE, SCRIPTS, child_env, free_port, run_group, toy_images, write_image_folder, write_tiny_cifar


def doc_commands(text, bench=False):
    """`python ...` / `torchrun ...` lines (backslash continuations joined, trailing comments dropped); the bench
    scripts' too with bench=True."""
    out, pending = [], ""
    for line in text.splitlines():
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith(("python ", "torchrun ")) and not line.startswith(("python -m pytest",) + ((not bench) * ("python bench/",))):
            out.append(" ".join(line.split(" # ")[0].split("  #")[0].split()))  # (continuations leave double spaces)
    return out


def script_doc_commands(script):
    doc = ast.get_docstring(ast.parse(open(os.path.join(HERE, script)).read()))
    return doc_commands(doc.split("\n\n")[1])


def readme_commands(path="README.md", bench=False):
    text = open(os.path.join(HERE, path)).read()
    blocks = re.findall(r"\n((?:    [^\n]*\n|\n)+)", text)  # indented code blocks
    return [c for b in blocks for c in doc_commands(b, bench)]


def bench_readme_commands():
    """bench/README.md's commands: its code blocks and the commands written inline (`python ...`), less those with
    placeholders (D, DIR, PHOTO), fragments (a launcher and a script, no flags) and elastic launches (several agents).
    The bench scripts' own commands are returned apart: they run for minutes to hours, so only their flags are checked."""
    text = open(os.path.join(HERE, "bench", "README.md")).read()
    inline = re.findall(r"`((?:python|torchrun) [^`]+)`", text.replace("\n", " "))
    scripts, bench = [], []
    for c in readme_commands("bench/README.md", bench=True) + [" ".join(c.split()) for c in inline]:
        tokens = shlex.split(c)
        placeholder = any(re.fullmatch(r"[A-Z]+", t) and t != "X" for t in tokens)
        fragment = tokens[0] == "torchrun" and tokens[-1].endswith(".py")
        if placeholder or fragment or "--nnodes=1:4" in c:
            continue
        (bench if tokens[1].startswith("bench/") else scripts).append(c)
    return list(dict.fromkeys(scripts)), list(dict.fromkeys(bench))


# Flags whose values a test must shrink (sizes, lengths), and what they become. Everything else runs as written.
SHRINK = {"--epochs": "1", "--batch-size": "4", "--image-size": "32", "--train-size": "32", "--val-size": "32",
          "--min-train-size": "32", "--val-resize": "36", "--workers": "1", "--num-iter": "12", "--verify": "10", "--device": "cpu"}


ADD = {"cifar.py": {"--epochs": "1", "--batch-size": "4"}, "lrfind.py": {"--num-iter": "12", "--batch-size": "4"},
       "imagenet_ddp.py": {"--epochs": "1", "--batch-size": "4", "--image-size": "32", "--workers": "0"}, "predict.py": {}}


def shrink(tokens, port):
    """The command as written, with its data under ./data, sizes shrunk, 8 GPUs become 2 processes, cuda the CPU."""
    script = next(t for t in tokens if t.endswith(".py"))
    out, i = [], 0
    while i < len(tokens):
        t = tokens[i].replace("/data/imagenet", "data/imagenet").replace("HOST0", "127.0.0.1")
        t = re.sub(r"--nproc_per_node=\d+", "--nproc_per_node=2", t).replace("--master_port=29500", f"--master_port={port}")
        if t in SHRINK and i + 1 < len(tokens):
            out += [t, SHRINK[t]]
            i += 2
            continue
        if t == "--ramp-epochs":
            out += [t, "0", "1"]
            i += 3
            continue
        out.append({"X": "0.1"}.get(t, t))
        i += 1
    if "--serve" not in out and "--evaluate" not in out and "--help" not in out:
        out += [x for k, v in ADD[script].items() if k not in out for x in (k, v)]
    if "--nnodes=2" in out:  # (2 nodes x 1 process: the global batch of one node's 2, so either run resumes the other)
        out[out.index("--nproc_per_node=2")] = "--nproc_per_node=1"
    return script, out


def make_doc_data(folder):
    """The data the commands name, tiny: CIFAR archives in ./data, class folders, ImageNet-style synset folders."""
    from PIL import Image
    write_tiny_cifar(folder / "data", "cifar10", n_train=16, n_test=8)
    write_tiny_cifar(folder / "data", "cifar100", n_train=16, n_test=8)
    write_image_folder(folder / "data" / "cifar10-jpg", splits=("train", "test"), per_class=(4, 2), size=32)
    os.symlink("test", folder / "data" / "cifar10-jpg" / "val")
    for name in ("fullsize", "imagenet-sample-400"):  # (bench/README.md's benchmarks of full-size photos)
        os.symlink("imagenet", folder / "data" / name)
    for name in ("cifar10-1000", "c10-1800", "c10-5k"):  # (bench/README.md's smaller CIFAR-10 folders)
        os.symlink("cifar10-jpg", folder / "data" / name)
    shutil.copytree(os.path.join(HERE, "samples"), folder / "samples")  # (shipped with the repository)
    for split, keep in (("train", 4), ("test", 2)):  # (the first run as written: its own test, below)
        for d in (folder / "samples" / "cifar10-1k" / split).iterdir():
            for photo in sorted(d.iterdir())[keep:]:
                photo.unlink()
    write_image_folder(folder / "data" / "imagenet", per_class=(8, 2), size=48)
    write_image_folder(folder / "data" / "imagenette-224", per_class=(4, 2), size=48,
                       classes=("n01440764", "n02102040", "n02979186"))
    for name in ("img.jpg", "some_photo.jpg", "photos/a.jpg", "photos/b.jpg", "more/c.png"):
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(toy_images(1, 3, seed=len(name), size=60)[0][0].transpose(1, 2, 0)).save(folder / name)
    torch.manual_seed(0)
    import torchvision.models as tvm
    sd = tvm.resnet50().state_dict()
    torch.save(sd, folder / "resnet50.pth")
    (folder / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, folder / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth")


def fresh_run_folder(script, argv):
    """The folder a fresh training command writes (None for anything else). The docs offer alternatives that write
    the same default folder (`--lr X`, then a recipe with CutMix): a user picks one; the test runs each, afresh."""
    if script not in ("cifar.py", "imagenet_ddp.py") or any(
            f in argv for f in ("--resume", "--evaluate", "--help")):
        return None
    value = lambda flag, default: argv[argv.index(flag) + 1] if flag in argv else default
    if "--out" in argv:
        return value("--out", None)
    if script == "cifar.py":
        return os.path.join("runs", f"{value('--dataset', 'cifar100')}-{value('--arch', 'resnet18')}")
    return os.path.join("runs", f"imagenet-{value('--arch', 'resnet50')}")


WHERE_FLAGS = ("--data-dir", "--device", "--batch-size")  # (where and on what it runs: here, tiny data on the CPU)


def command_shape(command):
    """A command's launcher, script and flag names, less those naming where it runs: two commands of one shape take
    the same code path here."""
    tokens = shlex.split(command)
    flags = sorted({t.split("=")[0] for t in tokens if t.startswith("--")} - set(WHERE_FLAGS))
    return (tokens[0], next(t for t in tokens if t.endswith(".py")), *flags)


def run_doc_command(command, folder, children):
    port = free_port()
    script, argv = shrink(shlex.split(command), port)
    out = fresh_run_folder(script, argv)
    if out:
        shutil.rmtree(folder / out, ignore_errors=True)
    env = child_env(argv, TORCH_HOME=str(folder / "torch"))
    if "--serve" in argv:
        pytest.importorskip("gradio")
        server = children([sys.executable if a == "python" else a for a in argv], cwd=folder, env=env)
        server.wait_for(r"demo on http://", timeout=180)
        return
    if "--nnodes=2" in argv:
        nodes = [children([sys.executable, "-m", "torch.distributed.run",
                           *[a.replace("--node_rank=0", f"--node_rank={r}") for a in argv[1:]]], cwd=folder, env=env)
                 for r in (0, 1)]
        results = [n.finish(timeout=600) for n in nodes]
        assert all(rc == 0 for rc, _ in results), f"{command}\n-> {argv}\n{results[0][1][-3000:]}"
        return
    cmd = [sys.executable, *argv[1:]] if argv[0] == "python" else [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    res = run_group(cmd, cwd=folder, env=env)
    assert res.returncode == 0, f"{command}\n-> {' '.join(argv)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def test_docs_list_launch_commands_for_every_script():
    readme = readme_commands()
    for script in SCRIPTS:
        assert script_doc_commands(script), script
        assert any(script in c for c in readme), script
    assert any(c.startswith("torchrun --nnodes=2") for c in readme)


@pytest.fixture(scope="module")
def doc_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    make_doc_data(folder)
    return folder


def test_readme_commands_run_as_written(doc_folder, children):
    """A fresh clone (the scripts, model.py and samples/) runs every command of README.md in order, then those of
    bench/README.md, on tiny data; a command of the same shape as one already run (the same flags, other values)
    takes the same code path and is not run again."""
    for f in (*SCRIPTS, "model.py"):
        shutil.copy(os.path.join(HERE, f), doc_folder / f)
    shapes = set()
    for command in readme_commands() + bench_readme_commands()[0]:
        if command_shape(command) not in shapes:
            shapes.add(command_shape(command))
            t0 = time.time()
            run_doc_command(command, doc_folder, children)
            print(f"{time.time() - t0:6.1f}s {command}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_docstring_commands_run_with_the_script_alone_beside_model(script, doc_folder, tmp_path, children):
    """Each script copied alone beside model.py into an empty folder runs its docstring's commands in order (those the
    READMEs repeat ran in the test above; the first runs here when all do). predict.py finds the checkpoint a user
    would have made by then."""
    folder = tmp_path / "alone"
    shutil.copytree(doc_folder, folder, symlinks=True, ignore=shutil.ignore_patterns("*.py", "runs"))
    for f in (script, "model.py"):
        shutil.copy(os.path.join(HERE, f), folder / f)
    assert sorted(f for f in os.listdir(folder) if f.endswith(".py")) == sorted({script, "model.py"})
    if script == "predict.py":
        assert cifar.main(["--dataset", "cifar100", "--data-dir", str(folder / "data"), "--epochs", "1", "--batch-size", "4",
                           "--out", str(folder / "runs" / "cifar100-resnet18")]) == 0
    commands = script_doc_commands(script)
    ran = set(readme_commands() + bench_readme_commands()[0])
    for command in [c for c in commands if c not in ran] or commands[:1]:
        run_doc_command(command, folder, children)


def test_bench_readme_commands_name_scripts_and_flags_that_exist():
    """The bench scripts' commands in bench/README.md: each script exists and compiles, and each flag it is given is
    one of its own (an add_argument of its source) or, for a script that hands the rest to a trainer (article_cifar.py),
    the trainer's. Read from the source: these scripts run for minutes to hours."""
    _, bench = bench_readme_commands()
    assert len(bench) >= 6, bench
    trainers = {o for m in (cifar, imagenet_ddp) for a in m.build_parser()._actions for o in a.option_strings}
    for command in bench:
        tokens = shlex.split(command)
        path = os.path.join(HERE, tokens[1])
        assert os.path.isfile(path), command
        tree = ast.parse(open(path).read())
        own = {a.value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
               for a in n.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
        passed_on = trainers if "parse_known_args" in open(path).read() else set()
        flags = [t.split("=")[0] for t in tokens[2:] if t.startswith("--")]
        assert all(f in own | passed_on for f in flags), (command, sorted(own))


def test_readme_reading_map_names_what_each_script_defines():
    """README's map of the code: every story function it names is a top-level definition of its script, above the
    heading where the machinery starts (main may close the file), and that heading is in the script."""
    text = open(os.path.join(HERE, "README.md")).read()
    rows = re.findall(r"^\| `(\w+\.py)` \| (`.+?) \| `# ([^`]+)`", text.split("## Reading the code", 1)[1], re.M)
    assert sorted(r[0] for r in rows) == sorted(SCRIPTS), rows
    for script, story, heading in rows:
        src = open(os.path.join(HERE, script)).read()
        defined = {n.name: n.lineno for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        lines = [i + 1 for i, l in enumerate(src.splitlines()) if l.startswith(f"# {heading}")]
        assert lines, (script, heading)
        for name in re.findall(r"`(\w+)`", story):
            assert name in defined, (script, name)
            assert name == "main" or defined[name] < lines[0], (script, name, heading)


def test_the_first_run_needs_no_network_and_prints_no_warning(tmp_path):
    """README's first training and predict commands, exactly as written, in a folder holding what a fresh clone
    holds, with the network cut (a network namespace of their own, where unshare can make one): they train on the
    photos in samples/, predict with the checkpoint just made, and print no warning."""
    for f in (*SCRIPTS, "model.py"):
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    shutil.copytree(os.path.join(HERE, "samples"), tmp_path / "samples")
    train, predict = readme_commands()[:2]
    assert "samples/" in train and " predict.py " in f" {predict} ", (train, predict)
    offline = ["unshare", "-n"] if run_group(["unshare", "-n", "true"]).returncode == 0 else []
    for command in (train, predict):
        res = run_group(offline + [sys.executable if t == "python" else t for t in shlex.split(command)], cwd=tmp_path)
        assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        assert "Warning" not in res.stderr and "Warning" not in res.stdout, res.stderr[-3000:]
    epochs = int(train.split("--epochs ")[1].split()[0])
    rows = [json.loads(l) for l in open(tmp_path / "runs" / "folder-resnet18" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), rows
    assert len(re.findall(r"\d+\.\d+%", res.stdout)) == 5, res.stdout  # predict's top-5


def test_readme_sbatch_commands_are_the_launch_scripts_the_slurm_tests_run():
    """README's SLURM commands name the scripts in slurm/, each opens with the same command, parses as bash, and is
    the one tests/test_slurm.py submits to a real SLURM."""
    text = open(os.path.join(HERE, "README.md")).read()
    commands = re.findall(r"^    (sbatch .*? (slurm/\S+\.sbatch))$", text, re.M)
    assert [c[1] for c in commands] == ["slurm/imagenet.sbatch", "slurm/cifar.sbatch"], commands
    tested = open(os.path.join(HERE, "tests", "test_slurm.py")).read()
    for command, script in commands:
        path = os.path.join(HERE, script)
        assert f"#   {command}\n" in open(path).read(), script
        assert run_group(["bash", "-n", path]).returncode == 0, script
        assert f'"{script}"' in tested, script
