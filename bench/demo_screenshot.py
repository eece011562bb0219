"""README's picture of the web demo: start `predict.py --serve` on a checkpoint, upload one photo in headless
Chromium (Debian's chromium and chromium-driver, through selenium), save the page as a PNG.

    python bench/demo_screenshot.py --checkpoint runs/imagenette-r18-128/best.pt --photo PHOTO --examples DIR --out bench/figures/demo.png
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--photo", required=True)
    p.add_argument("--examples", default=None)
    p.add_argument("--out", default="bench/figures/demo.png")
    a = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, os.path.join(HERE, "predict.py"), "--serve", "--checkpoint", a.checkpoint, "--port", str(port)]
    server = subprocess.Popen(cmd + (["--examples", a.examples] if a.examples else []), stdout=subprocess.PIPE, text=True)
    try:
        while "demo on" not in server.stdout.readline():
            pass
        opts = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1200,900"):
            opts.add_argument(arg)
        opts.binary_location = shutil.which("chromium")
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        browser.get(f"http://127.0.0.1:{port}/")
        time.sleep(3)
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(os.path.abspath(a.photo))
        deadline = time.time() + 60
        while os.path.basename(a.photo) not in browser.find_element(By.ID, "status").text and time.time() < deadline:
            time.sleep(0.3)
        time.sleep(1)
        browser.save_screenshot(a.out)
        browser.quit()
        print(f"saved {a.out}")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
