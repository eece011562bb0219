"""The bench/ tools that print the figures README's speed rows quote: each runs on tiny data and prints its JSON."""
import ast
import importlib.util
import json
import os
import sys

import pytest

from conftest import HERE, run_group, write_tiny_cifar


def bench_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar_speed_prints_json(tmp_path, capsys):
    data = write_tiny_cifar(tmp_path / "d", n_train=64, n_test=16)
    speed = bench_module("cifar_speed")
    assert speed.main(["--dataset", "cifar10", "--data-dir", str(data), "--steps", "2", "--batch-size", "16",
                       "--out", str(tmp_path / "o")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("compute_img_per_s", "pipeline_img_per_s", "pipeline_vs_compute", "train_gflop_per_img", "mfu"):
        assert res[key] > 0, key
    assert 3.0 < res["train_gflop_per_img"] < 3.6  # ResNet-18 CIFAR: 0.56 GMAC = 1.11 GFLOP forward, x3 for training
    assert res["steps"] == 2 and res["batch_size"] == 16
    assert not (tmp_path / "o").exists()  # a benchmark writes nothing
    assert speed.main(["--dataset", "cifar10", "--data-dir", str(data), "--steps", "0"]) == 2
    assert capsys.readouterr().err == "cifar_speed.py: error: --steps must be >= 1\n"


def test_imagenet_speed_prints_json(inet_data, tmp_path, capsys):
    speed = bench_module("imagenet_speed")
    base = ["--data", str(inet_data), "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "1",
            "--out", str(tmp_path / "o")]
    assert speed.main(base + ["--steps", "3"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 3 and res["compute_img_per_s"] > 0 and res["pipeline_img_per_s"] > 0
    assert 0 <= res["data_wait_pct"] <= 100 and res["train_size"] == 32 and res["workers"] == 1
    assert speed.main(["--loader-only", "--steps", "4"] + base) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 32 and res["img_per_s"] > 0 and res["img_per_s_per_worker"] == res["img_per_s"]
    assert not (tmp_path / "o").exists()
    assert speed.main(base + ["--steps", "30"]) == 2
    assert "too few to time --steps 30" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cifar_speed", "imagenet_speed"])
def test_bench_speed_scripts_refuse_bad_flags_in_one_line(name, capsys):
    speed = bench_module(name)
    assert speed.main(["--arch", "resnet9000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}.py: error: argument --arch") and err.count("\n") == 1, err


def cuda_branches(script):
    """(script, name) of each top-level function or class whose code (docstrings and comments aside) names CUDA."""
    src = open(os.path.join(HERE, script)).read()
    found = set()
    for node in ast.parse(src).body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name == "build_parser":  # (--device choices)
            continue
        for inner in ast.walk(node):  # docstrings out
            body = getattr(inner, "body", None)
            first = body[0] if isinstance(body, list) and body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                inner.body = body[1:] or [ast.Pass()]
        if "cuda" in ast.unparse(node):
            found.add((script, node.name))
    return found


def test_gpu_check_names_every_cuda_branch_and_its_dry_run_passes():
    """bench/gpu_check.py runs every CUDA path of the four scripts on a GPU: each function with a CUDA branch has its
    row, and the dry run (the same sequence on the CPU, less what only a GPU runs) passes row by row."""
    check = bench_module("gpu_check")
    found = set().union(*(cuda_branches(s) for s in ("cifar.py", "imagenet_ddp.py", "lrfind.py", "predict.py")))
    assert found == set(check.BRANCHES), (sorted(found - set(check.BRANCHES)), sorted(set(check.BRANCHES) - found))
    assert set(check.BRANCHES.values()) <= set(check.ROWS)
    res = run_group([sys.executable, os.path.join("bench", "gpu_check.py"), "--dry-run"], timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = res.stdout.split("\npath ", 1)[1]
    for key, row in check.ROWS.items():
        line = next(l for l in table.splitlines() if l.startswith(row))
        assert line[len(row):].split()[0] == ("skip" if row.startswith("GPU only") else "pass"), line
