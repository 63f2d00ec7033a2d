"""How soon a command answers when it has no work to do: each command's `--help`, and a value the
schema refuses, timed as whole processes against importing Lightning, which every answer cost
before the heavy libraries were imported only past the configuration check.

usage: python bench/cli_startup.py [--runs 5]
       python bench/cli_startup.py --tiny       # one run each: the CI smoke test

Target: every answer under 1 s, and at most 0.25x the time of `import pytorch_lightning`.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import console

from cnnpipe.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
CNNPIPE = str(Path(sys.executable).parent / "cnnpipe")
LIMIT_S, LIMIT_RATIO = 1.0, 0.25


def seconds(command: list[str], cwd: Path, runs: int) -> float:
    """The median wall time of `command`, which must end (with any exit status) in 60 s."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, capture_output=True, timeout=60)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases(stages: list[str]) -> dict[str, list[str]]:
    """Each command's --help; each stage with a refused value in params.yaml; a Hydra job with a
    refused value on its command line."""
    found = {f"{c} --help": [CNNPIPE, c, "--help"] for c in COMMANDS}
    found |= {f"{s} (bad params.yaml)": [CNNPIPE, s] for s in stages}
    return found | {"train optim.lr=fast": [CNNPIPE, "train", "optim.lr=fast"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command (median)")
    parser.add_argument("--tiny", action="store_true", help="one run each, for the tests")
    args = parser.parse_args()
    runs = 1 if args.tiny else args.runs
    stages = [c for c in COMMANDS if c not in ("params", "predict", "serve", "review")]
    with tempfile.TemporaryDirectory() as folder:
        here = Path(folder)
        shutil.copytree(ROOT / "conf", here / "conf", ignore=shutil.ignore_patterns("local"))
        (here / "params.yaml").write_text("optim:\n  lr: fast\n")
        baseline = seconds([sys.executable, "-c", "import pytorch_lightning"], here, runs)
        timed = {name: seconds(command, here, runs) for name, command in cases(stages).items()}
    print(f"{console.cpu_name()}, median of {runs} run(s) each, whole processes")
    print(f"import pytorch_lightning: {baseline:.2f} s (the baseline)")
    print(f"{'command':<32} {'seconds':>8} {'x baseline':>11}")
    for name, took in timed.items():
        print(f"{name:<32} {took:>8.2f} {took / baseline:>11.2f}")
    slowest = max(timed, key=timed.get)
    worst = timed[slowest]
    met = worst < LIMIT_S and worst / baseline <= LIMIT_RATIO
    print(
        f"slowest: {slowest}, {worst:.2f} s = {worst / baseline:.2f}x the baseline; target "
        f"< {LIMIT_S:g} s and <= {LIMIT_RATIO}x: {'met' if met else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
