"""A model swap under load: `cnnpipe serve models:/NAME@champion` (two workers, the default)
follows its alias while `ab` (Debian's apache2-utils) sends one JPEG per request from 16 clients;
a few seconds in, @champion moves from version 1 to version 2.

usage: python bench/swap_load.py [--model models/model.onnx] [--new models/int8/model.onnx]
       python bench/swap_load.py --tiny    # random weights, a short run: the CI smoke test

Target: no failed request. Reports the p99 latency of the requests started in the seconds of the
swap (from the alias moving to both workers serving version 2) against the p99 of the others.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import onnx
from service_load import jpeg_file, need_ab, start_server, tiny_model

from cnnpipe.base.localhost import free_port

CLIENTS = 16
NAME = "bench-swap"


def register(folder: Path, files: list[Path]) -> str:
    """The files as versions 1, 2 ... of NAME in a sqlite store under `folder`, @champion on 1:
    the store's URI."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("swap", artifact_location=(folder / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        for file in files:
            mlflow.onnx.log_model(onnx.load(file), name="m", registered_model_name=NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    return uri


def ab_log(port: int, jpeg: Path, seconds: int, log: Path) -> subprocess.CompletedProcess:
    """`ab` for `seconds`, every request's start (epoch s) and total time (ms) in `log`."""
    command = ["ab", "-q", "-t", str(seconds), "-n", "10000000", "-c", str(CLIENTS)]
    command += ["-p", str(jpeg), "-T", "image/jpeg", "-g", str(log)]
    return subprocess.run(
        [*command, f"http://127.0.0.1:{port}/predict"],
        capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip


def swapped(port: int) -> float:
    """How many workers have swapped in a new version, by the service's own counter."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('cnnpipe_model_swaps_total{outcome="swapped"}'):
                return float(line.split()[-1])
    return 0


def both_swapped(port: int, deadline_s: float) -> float:
    """When both workers serve the new version (epoch s), polled every 50 ms."""
    deadline = time.monotonic() + deadline_s
    while swapped(port) < 2:
        if time.monotonic() > deadline:
            sys.exit(f"the workers did not swap within {deadline_s:g} s")
        time.sleep(0.05)
    return time.time()


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/model.onnx")
    parser.add_argument("--new", help="version 2's file (default: --model again)")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    need_ab()
    seconds = 6 if args.tiny else args.seconds
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = tiny_model(folder) if args.tiny else Path(args.model)
        os.environ["MLFLOW_TRACKING_URI"] = register(folder, [model, Path(args.new or model)])
        jpeg, log, port = jpeg_file(folder), folder / "ab.tsv", free_port()
        server = start_server(f"models:/{NAME}@champion", port, "--alias-check-s", "0.2")
        try:
            ab_log(port, jpeg, 1, folder / "warm-up.tsv")
            done: list[subprocess.CompletedProcess] = []
            load = threading.Thread(target=lambda: done.append(ab_log(port, jpeg, seconds, log)))
            load.start()
            time.sleep(seconds / 3)
            moved = time.time()
            mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "2")
            served = both_swapped(port, deadline_s=30)
            load.join()
        finally:
            server.terminate()
            server.wait()
        out = done[0].stdout
        rows = [line.split("\t") for line in log.read_text().splitlines()[1:]]
    report(out, [(int(r[1]), float(r[4])) for r in rows], moved, served)


def report(out: str, requests: list[tuple[int, float]], moved: float, served: float) -> None:
    failed = int(re.search(r"Failed requests:\s+(\d+)", out)[1])
    not_ok = re.search(r"Non-2xx responses:\s+(\d+)", out)
    failed += int(not_ok[1]) if not_ok else 0
    during = [ms for start, ms in requests if int(moved) <= start <= int(served)]
    others = [ms for start, ms in requests if not int(moved) <= start <= int(served)]
    print(
        f"ab, {CLIENTS} clients, {len(requests)} JPEG requests; @champion moved to version 2, "
        f"both workers serving it {served - moved:.2f} s later"
    )
    print(
        f"p99 of the {len(during)} requests started in the swap's second(s): {p99(during):.0f} ms; "
        f"of the {len(others)} others: {p99(others):.0f} ms"
    )
    verdict = "met" if not failed else "MISSED"
    print(f"{failed} failed or not 200 (target 0): {verdict}")
    if failed:
        sys.exit(f"{failed} requests failed")


if __name__ == "__main__":
    main()
