"""Find flaky tests before CI does: run test files N rounds in a row and print each test's pass count.

    python bench/flakes.py                        # 5 rounds of the torchrun-heavy files
    python bench/flakes.py --rounds 5 --hog-rounds 1 tests/test_imagenet_ddp.py tests/test_trainers.py

--hog-rounds K runs the last K rounds with one busy-looping process beside them (a loaded CI machine).
Exits 1 when any test failed in any round. Every process it starts (the hogs, pytest) ends with it.
"""
import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

DEFAULT_FILES = ["tests/test_imagenet_ddp.py", "tests/test_trainers.py"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", default=DEFAULT_FILES, help="test files (or pytest node ids)")
    p.add_argument("--rounds", type=int, default=5, help="rounds in a row")
    p.add_argument("--hog-rounds", type=int, default=1, help="how many of the last rounds run beside a CPU hog")
    p.add_argument("-k", default=None, help="pytest's -k expression")
    args = p.parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    passed, runs = collections.Counter(), collections.Counter()
    for r in range(args.rounds):
        hog = r >= args.rounds - args.hog_rounds
        t0 = time.time()
        outcomes = one_round(args.files, args.k, hog)
        for name, ok in outcomes.items():
            runs[name] += 1
            passed[name] += ok
        bad = sorted(n for n, ok in outcomes.items() if not ok)
        print(f"round {r + 1}/{args.rounds}{' (CPU hog)' if hog else ''}: {len(outcomes) - len(bad)} passed, "
              f"{len(bad)} failed in {time.time() - t0:.0f} s {' '.join(bad)}", flush=True)
    width = max(map(len, runs), default=0)
    for name in sorted(runs):
        print(f"{name:<{width}}  {passed[name]}/{runs[name]}")
    failures = sum(runs.values()) - sum(passed.values())
    print(f"{failures} failures in {sum(runs.values())} test runs")
    return 1 if failures else 0


def one_round(files, k, hog):
    """{test id: passed} from one pytest run (skipped tests count as passed)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])] if hog else []
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        try:
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                            *(["-k", k] if k else []), *files], stdout=subprocess.DEVNULL)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        cases = ET.parse(xml).getroot().iter("testcase")
        return {f"{c.get('classname').rsplit('.', 1)[-1]}::{c.get('name')}":
                c.find("failure") is None and c.find("error") is None for c in cases}


if __name__ == "__main__":
    sys.exit(main())
