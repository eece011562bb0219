"""The layout: every script stands alone beside model.py, reads top to bottom as its story, carries the shared
helpers as byte-identical copies, and stays small enough to read."""
import ast
import importlib
import itertools
import os
import re

import pytest

from conftest import HERE, SCRIPTS, run_script


def _imports(path):
    tree = ast.parse(open(os.path.join(HERE, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_scripts_import_model_and_no_sibling():
    siblings = {s[:-3] for s in SCRIPTS}
    for script in SCRIPTS:
        names = _imports(script)
        assert "model" in names, script
        assert not names & siblings, (script, names & siblings)
    assert not _imports("model.py") & siblings


def test_functions_stay_short_and_take_few_parameters():
    """The house rule: no function over ~60 lines or ~8 parameters (what a run carries goes in one named object)."""
    too_big = []
    for path in (*SCRIPTS, "model.py"):
        for node in ast.walk(ast.parse(open(os.path.join(HERE, path)).read())):
            if isinstance(node, ast.FunctionDef):
                a = node.args
                params = len(a.args) + len(a.kwonlyargs) - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or params > 8:
                    too_big.append(f"{path}:{node.lineno} {node.name} ({lines} lines, {params} parameters)")
    assert not too_big, too_big


def test_the_trainers_stay_minimal():
    """The sizes the trainers were brought down to (imagenet_ddp.py had grown to 1,710 lines in 88 definitions):
    growth past them is a design question, not an edit. Lines at most 120 characters in every script and model.py."""
    def size(path):
        text = open(os.path.join(HERE, path)).read()
        defs = [n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        return len(text.splitlines()), len(defs), [i + 1 for i, l in enumerate(text.splitlines()) if len(l) > 120]
    inet, cifar = size("imagenet_ddp.py"), size("cifar.py")
    assert inet[0] <= 1200 and inet[1] <= 60 and cifar[0] <= 875, (inet[:2], cifar[:2])
    long_lines = {path: size(path)[2] for path in (*SCRIPTS, "model.py", "test_model.py")}
    assert not any(long_lines.values()), long_lines


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_flag_groups_and_launch_commands(script):
    res = run_script(script, "--help")
    assert res.returncode == 0, res.stderr
    for group in ("data:", "model:", "runtime:", "output:") + (("optimisation:",) if script != "predict.py" else ()):
        assert f"\n{group}\n" in res.stdout, (script, group)
    doc = ast.get_docstring(ast.parse(open(os.path.join(HERE, script)).read()))
    commands = [l.strip() for l in doc.split("\n\n")[1].splitlines() if l.strip().startswith(("python", "torchrun"))]
    assert commands and all(c in res.stdout for c in commands), script
    assert "(default: " in res.stdout


# Defined in more than one script, but each script's own: the same name for a different job in another story.
OWN = {"build_parser", "get_args", "main", "Run", "build_run", "build_schedule", "EpochSums", "evaluate", "train_step",
       "train_one_epoch", "load_resume", "rebuild_info", "RESUME_MUST_MATCH",
       "restore_training_state", "Place"}


def top_level_definitions(path):
    """{name: source text} of a file's top-level functions, classes and assignments (decorators included)."""
    src = open(os.path.join(HERE, path)).read()
    lines, out = src.splitlines(True), {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        out[name] = "".join(lines[start - 1:node.end_lineno])
    return out


def test_carried_copies_are_byte_identical_wherever_they_are_carried():
    """What a script carries from another (each stands alone beside model.py) is the same text, to the byte: a fix in
    one copy that does not reach the others fails here. Names in OWN are each script's own and must really differ."""
    defs = {s: top_level_definitions(s) for s in SCRIPTS}
    carried, drifted, own_seen = set(), [], set()
    for a, b in itertools.combinations(SCRIPTS, 2):
        for name in sorted(set(defs[a]) & set(defs[b])):
            if name in OWN:
                own_seen.add(name)
                assert defs[a][name] != defs[b][name], f"{name} is the same in {a} and {b}: a copy, not its own"
            elif defs[a][name] != defs[b][name]:
                drifted.append(f"{name} ({a} vs {b})")
            else:
                carried.add(name)
    assert not drifted, "copies that drifted apart: " + ", ".join(drifted)
    assert own_seen == OWN  # (a name that left a script must leave OWN too)
    lrfind_carries = {"epoch_order", "batch_randomness", "augment", "draw_augmentation", "augmented_photo"}
    assert lrfind_carries <= carried and {"StopFlag", "UserError", "pick_device", "pick_amp", "training_state",
                                          "diverged"} <= carried, carried


def _first_line_of(path, name):
    for node in ast.parse(open(os.path.join(HERE, path)).read()).body:
        if getattr(node, "name", None) == name:
            return node.lineno
    raise KeyError(name)


@pytest.mark.parametrize("script,loop", [("imagenet_ddp.py", "train_one_epoch"), ("cifar.py", "train_one_epoch")])
def test_each_trainer_reads_as_its_story(script, loop):
    """The command line, main and the epoch loop first (within the file's first ~350 lines, docstring included);
    the operations (signals, workers, metrics) after the training story, under one heading."""
    text = open(os.path.join(HERE, script)).read()
    assert _first_line_of(script, "main") < _first_line_of(script, loop) < 350
    operations = text.index("# ==== Operations: the machinery around the training story")
    for helper in ("StopFlag", "pick_device"):
        assert text.index(f"\n{'class' if helper[0].isupper() else 'def'} {helper}") > operations, helper


def test_the_flag_index_names_every_flag_and_only_tests_that_exist():
    """tests/README.md says which test fails when a flag is ignored: every flag of every script's --help is in it, and
    every test it names exists (the `test_` prefix dropped)."""
    index = open(os.path.join(HERE, "tests", "README.md")).read()
    rows = [r for r in index.splitlines() if r.startswith("| ") and r.split("|")[1].strip() in SCRIPTS]
    for script in SCRIPTS:
        listed = " ".join(r.split("|")[2] for r in rows if r.split("|")[1].strip() == script)
        parser = importlib.import_module(script[:-3]).build_parser()
        flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
        flags = {f for f in flags if not (f.startswith("--no-") and "--" + f[5:] in flags)}  # (--no-channels-last)
        missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", listed))
        assert not missing, (script, missing)
    tests = {node.name[len("test_"):] for path in os.listdir(os.path.join(HERE, "tests")) if path.endswith(".py")
             for node in ast.walk(ast.parse(open(os.path.join(HERE, "tests", path)).read()))
             if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    named = {n.strip().split(" ")[0] for r in index.splitlines() if r.startswith("| ") for n in r.split("|")[-2].split(",")}
    named = {n for n in named if re.fullmatch(r"[a-z0-9_]+", n) and "_" in n}
    assert named and not named - tests, sorted(named - tests)


def test_the_cards_top_level_files_and_requirements_that_leave_torch_alone():
    """The design card's seven top-level files, and requirements.txt asking for lower bounds only: an exact pin would
    make `pip install -r requirements.txt` swap out a user's own torch build (CI pins through .ci/constraints.txt)."""
    card = ("model.py", "cifar.py", "imagenet_ddp.py", "lrfind.py", "predict.py", "test_model.py", "README.md")
    assert all(os.path.isfile(os.path.join(HERE, f)) for f in card)
    reqs = [l.split("#")[0].strip() for l in open(os.path.join(HERE, "requirements.txt"))]
    core = [r for r in reqs if re.match(r"(torch|torchvision)\b", r)]
    assert len(core) == 2 and all(re.fullmatch(r"torch(vision)?>=[\d.]+", r) for r in core), core
