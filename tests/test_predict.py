"""Tests of predict."""
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch

import model as M
import predict

from conftest import HERE, free_port, read_jsonl, run_script, write_evil_checkpoint, write_png_bomb


def test_predict_agrees_with_the_checkpoint_and_its_val_top1(cifar_run):
    root, data = cifar_run
    # (--amp off: the reference below runs in fp32; auto picks bf16 on CPUs with native bf16)
    res = run_script("predict.py", data / "test", "--checkpoint", root / "run" / "best.pt", "--json", "--batch-size", "7",
                     "--amp", "off")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(l) for l in res.stdout.splitlines()]
    assert len(rows) == 30 and all(len(r["top"]) == 3 for r in rows)  # top-5 capped at the 3 classes
    # each image's probabilities are the softmax of the checkpoint's network on model.py's preprocessing
    ck = M.load_checkpoint(root / "run" / "best.pt")
    net = M.model_from_checkpoint(ck).eval()
    x = torch.stack([M.eval_image(r["path"], 32) for r in rows])
    with torch.no_grad():
        probs = net(M.normalize(x, ck["mean"], ck["std"])).softmax(1)
    for r, p in zip(rows, probs):
        assert [t["index"] for t in r["top"]] == p.argsort(descending=True).tolist()
        assert [t["prob"] for t in r["top"]] == pytest.approx(sorted(p.tolist(), reverse=True), abs=2e-6)
        assert r["top"][0]["label"] == ck["classes"][r["top"][0]["index"]]
    correct = sum(r["top"][0]["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert 100.0 * correct / len(rows) == pytest.approx(ck["val_top1"], abs=1e-9)
    assert read_jsonl(root / "run" / "metrics.jsonl")[-1]["val_top1"] == ck["val_top1"]


def test_predict_flags_change_the_computation(cifar_run, tmp_path, capsys):
    root, data = cifar_run
    img = str(sorted((data / "test" / "cat").iterdir())[0])
    base = [img, "--checkpoint", str(root / "run" / "best.pt"), "--json"]
    outs = {}
    for name, flags in (("fp32", ["--amp", "off"]), ("bf16", ["--amp", "bf16"]), ("nchw", ["--amp", "off", "--no-channels-last"])):
        assert predict.main(base + flags) == 0
        outs[name] = json.loads(capsys.readouterr().out)["top"]
    assert [t["prob"] for t in outs["fp32"]] == pytest.approx([t["prob"] for t in outs["nchw"]], abs=1e-5)
    assert [t["prob"] for t in outs["fp32"]] != [t["prob"] for t in outs["bf16"]]  # bf16 rounds differently
    assert predict.main(base + ["--topk", "2"]) == 0 and len(json.loads(capsys.readouterr().out)["top"]) == 2
    # --image-size sets a bare state_dict's input size (the ImageNet transform)
    torch.save(M.resnet18(4).state_dict(), tmp_path / "sd.pth")
    args = predict.get_args(["x.jpg", "--checkpoint", str(tmp_path / "sd.pth"), "--arch", "resnet18", "--image-size", "64"])
    p = predict.load_predictor(args)
    assert p.pre["size"] == 64 and p.pre["resize"] == 73 and p.pixels(img).shape == (3, 64, 64)


def test_predict_default_checkpoint_text_output_and_globs(cifar_run, tmp_path):
    root, data = cifar_run
    runs = tmp_path / "runs" / "x"
    runs.mkdir(parents=True)
    (runs / "best.pt").write_bytes((root / "run" / "best.pt").read_bytes())
    img = sorted((data / "test" / "cat").iterdir())[0]
    res = run_script("predict.py", img, data / "test" / "dog" / "*.png", "--topk", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "using checkpoint runs/x/best.pt" in res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 + 10 and lines[0].startswith(f"{img}: ") and lines[0].count("%)") == 2
    none = run_script("predict.py", img, cwd=tmp_path / "runs")
    assert none.returncode == 2 and "Traceback" not in none.stderr
    assert "python cifar.py --dataset cifar10 --epochs 1" in none.stderr and "--pretrained" in none.stderr


def test_predict_bad_files_and_odd_modes(cifar_run, tmp_path):
    from PIL import Image
    root, _ = cifar_run
    Image.new("L", (50, 40), 90).save(tmp_path / "gray.png")
    Image.new("CMYK", (40, 40), (10, 20, 30, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (40, 40)).save(tmp_path / "pal.gif")
    Image.new("RGBA", (40, 40), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    Image.new("RGB", (3000, 2000), (200, 10, 10)).save(tmp_path / "big.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 3])
    names = ["gray.png", "cmyk.jpg", "pal.gif", "rgba.png", "big.jpg", "empty.jpg", "text.jpg", "trunc.jpg", "missing.jpg"]
    res = run_script("predict.py", *[tmp_path / n for n in names], "--checkpoint", root / "run" / "best.pt", "--json")
    assert res.returncode == 1
    ok = {os.path.basename(json.loads(l)["path"]) for l in res.stdout.splitlines()}
    assert ok == {"gray.png", "cmyk.jpg", "pal.gif", "rgba.png", "big.jpg"}
    err = res.stderr.strip().splitlines()[1:]  # after "using checkpoint ..."
    assert len(err) == 4 and "Traceback" not in res.stderr
    assert any("empty.jpg: empty file" in l for l in err) and any("missing.jpg: no such file" in l for l in err)
    assert any("text.jpg: cannot read image" in l for l in err) and any("trunc.jpg: cannot read image" in l for l in err)
    if not torch.cuda.is_available():  # --device reaches pick_device: here CUDA is asked for and refused in one line
        res = run_script("predict.py", tmp_path / "big.jpg", "--checkpoint", root / "run" / "best.pt", "--device", "cuda")
        assert res.returncode == 2 and res.stderr.strip().endswith("--device cuda asked for, but CUDA is not available")


def test_predict_torchvision_state_dict_gets_imagenet_names(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    from PIL import Image
    torch.manual_seed(0)
    torch.save({"module." + k: v for k, v in tvm.resnet50().state_dict().items()}, tmp_path / "r50.pth")
    Image.new("RGB", (300, 260), (30, 120, 200)).save(tmp_path / "a.jpg")
    res = run_script("predict.py", tmp_path / "a.jpg", "--checkpoint", tmp_path / "r50.pth", "--arch", "resnet50", "--json")
    assert res.returncode == 0, res.stderr
    top = json.loads(res.stdout)["top"]
    cats = M.imagenet_class_names()
    assert len(top) == 5 and len(cats) == 1000 and all(t["label"] == cats[t["index"]] for t in top)
    need = run_script("predict.py", tmp_path / "a.jpg", "--checkpoint", tmp_path / "r50.pth")
    assert need.returncode == 2 and "--arch" in need.stderr
    wrong = run_script("predict.py", tmp_path / "a.jpg", "--checkpoint", tmp_path / "r50.pth", "--arch", "resnet18")
    assert wrong.returncode == 2 and "does not fit resnet18" in wrong.stderr


def test_predict_pretrained_loads_torchvision_weights_from_the_cache(tmp_path, monkeypatch, capsys):
    """--pretrained: torchvision's ImageNet ResNet-50 file (here one the test writes into the torch hub cache) loads key
    for key into model.py's ResNet-50, with the weights' own sizes (resize 232, crop 224) and class names; with no
    file and no network, one line names the download."""
    tvm = pytest.importorskip("torchvision.models")
    from PIL import Image
    torch.manual_seed(0)
    ref = tvm.resnet50().eval()
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), hub / "checkpoints" / "resnet50-11ad3fa6.pth")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert predict.main([str(tmp_path / "a.png"), "--pretrained", "--json", "--amp", "off"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    with torch.no_grad():
        probs = ref(M.normalize(M.eval_image(tmp_path / "a.png", 224, 232)[None], M.IMAGENET_MEAN, M.IMAGENET_STD)).softmax(1)[0]
    assert [t["index"] for t in top] == probs.topk(5).indices.tolist()
    assert [t["prob"] for t in top] == pytest.approx(probs.topk(5).values.tolist(), abs=1e-5)
    assert top[0]["label"] == M.imagenet_class_names()[top[0]["index"]]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    monkeypatch.setitem(predict.PRETRAINED, "url", "http://127.0.0.1:9/resnet50-11ad3fa6.pth")  # nothing listens there
    assert predict.main([str(tmp_path / "a.png"), "--pretrained"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pretrained cannot download" in err and "resnet50-11ad3fa6.pth" in err


def test_predict_refuses_pickled_code(tmp_path):
    write_evil_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    (tmp_path / "a.png").write_bytes(b"")
    res = run_script("predict.py", tmp_path / "a.png", "--checkpoint", tmp_path / "evil.pt")
    assert res.returncode == 2 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "pwned").exists()


def test_predict_serve_without_gradio_says_how(tmp_path, cifar_run, capsys, monkeypatch):
    root, _ = cifar_run
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert predict.main(["--serve", "--checkpoint", str(root / "run" / "best.pt")]) == 2
    err = capsys.readouterr().err
    assert "pip install -r requirements-demo.txt" in err and len(err.strip().splitlines()) == 1


def _browser():
    """Debian's headless Chromium through selenium and the system chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _wait_until(fn, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out waiting for the page")


def test_demo_in_a_real_browser_matches_the_command_line(cifar_run, tmp_path, children):
    """predict.py --serve, driven in headless Chromium as a person uses it: upload two photos, read the top classes the
    page shows, compare them with `predict.py FILE --json`; a broken upload and a decompression bomb get a message on
    the page. The screenshot after an upload is kept in the test's tmp folder."""
    missing = [n for n, ok in (("chromium", shutil.which("chromium")), ("chromedriver", shutil.which("chromedriver")))
               if not ok]
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        pytest.skip(f"the browser test needs {', '.join(missing)} (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    root, data = cifar_run
    ckpt = root / "run" / "best.pt"
    photos = [sorted((data / "test" / c).iterdir())[0] for c in ("cat", "fox")]
    port = free_port()
    server = children([sys.executable, os.path.join(HERE, "predict.py"), "--serve", "--checkpoint", str(ckpt),
                       "--port", str(port), "--examples", str(data / "test" / "dog")])
    server.wait_for(rf"demo on http://127.0.0.1:{port}", timeout=180)
    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        info = _wait_until(lambda: browser.find_elements(By.ID, "model-info"))[0].text
        assert str(ckpt) in info and "resnet18" in info and "cat, dog, fox" in info
        assert f"{M.load_checkpoint(ckpt)['val_top1']:.2f}%" in info
        example = sorted((data / "test" / "dog").iterdir())[0].name
        _wait_until(lambda: example in browser.page_source)  # the --examples, clickable
        for n, photo in enumerate(photos):
            cli = json.loads(run_script("predict.py", photo, "--checkpoint", ckpt, "--json").stdout)["top"]
            browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(photo))
            _wait_until(lambda: photo.name in browser.find_element(By.ID, "status").text)
            shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#top-classes dt")]
            confid = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#top-classes dd")]
            assert shown == [t["label"] for t in cli], (shown, cli)
            assert confid == [f"{round(100 * t['prob'])}%" for t in cli]
            if n == 0:
                browser.save_screenshot(str(tmp_path / "demo.png"))
            browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
        (tmp_path / "broken.jpg").write_text("this is not a photo")
        write_png_bomb(tmp_path / "bomb.png")
        from PIL import Image
        Image.new("RGB", (400, 300), (200, 30, 30)).save(tmp_path / "whole.jpg")
        (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:600])
        for bad, reason in ((tmp_path / "broken.jpg", "cannot read image"), (tmp_path / "truncated.jpg", "cannot read image"),
                            (tmp_path / "bomb.png", "DecompressionBomb")):
            browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(bad))
            status = _wait_until(lambda: bad.name in browser.find_element(By.ID, "status").text and
                                 browser.find_element(By.ID, "status").text)
            assert "Cannot classify" in status and reason in status, status
            browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
        assert server.proc.poll() is None  # the server is still up
    finally:
        browser.quit()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'demo.png'}")
