"""What `cnnpipe serve --capture` and the drift gauges cost a loaded service: the same model file
served as it starts by default, with capture (default threshold and share), and without the
drift gauges (--drift-window 0), in turn, under `ab` (Debian's apache2-utils) at 64 clients, one
JPEG per request, several rounds each.

usage: python bench/capture_load.py [--model models/model.onnx] [--rounds 3]
       python bench/capture_load.py --tiny    # random weights, short rounds: the CI smoke test

Target: with capture, at least 0.95x the requests/s without it, and with the drift gauges at
least 0.95x the requests/s without them (the median round of each), and no failed request. A
random model is unsure of every image, so under --tiny every request is offered to capture: more
than a trained model's share.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from service_load import apache_bench, jpeg_file, need_ab, start_server, tiny_model

from cnnpipe.base.localhost import free_port

TARGET = 0.95
# The service as it starts by default (drift gauges on), with capture, and without the gauges;
# DIR is a round's capture folder.
VARIANTS = {
    "without capture": (),
    "with capture": ("--capture", "DIR"),
    "without drift gauges": ("--drift-window", "0"),
}


def rates(model: Path, jpeg: Path, requests: int, *options: str) -> tuple[float, float, int]:
    """One round: the service started with `options`, warmed up, then `ab -c 64`."""
    port = free_port()
    server = start_server(model, port, *options)
    try:
        apache_bench(port, jpeg, 4, 100)
        return apache_bench(port, jpeg, 64, requests)
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/model.onnx")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    need_ab()
    rounds, requests = (1, 300) if args.tiny else (args.rounds, args.requests)
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = tiny_model(folder) if args.tiny else Path(args.model)
        jpeg = jpeg_file(folder)
        for i in range(rounds):
            for name, options in VARIANTS.items():
                options = [o.replace("DIR", str(folder / f"kept{i}")) for o in options]
                rate, _, bad = rates(model, jpeg, requests, *options)
                runs[name].append(rate)
                failed += bad
        kept = sum(len(list(folder.glob(f"kept{i}/*.jpg"))) for i in range(rounds))
    median = {name: statistics.median(each) for name, each in runs.items()}
    print(f"ab, 64 clients, {requests} JPEG requests a round, {rounds} round(s) each:")
    for name, each in runs.items():
        print(f"{name + ':':<22}{', '.join(f'{r:.0f}' for r in each)} requests/s")
    print(f"kept with capture: {kept} image(s)")
    ratios = {
        "capture, with / without": median["with capture"] / median["without capture"],
        "drift gauges, on / off": median["without capture"] / median["without drift gauges"],
    }
    met = all(r >= TARGET for r in ratios.values()) and not failed
    for what, ratio in ratios.items():
        print(f"{what}: {ratio:.3f} (target >= {TARGET})")
    print(f"{failed} failed or not 200: {'met' if met else 'MISSED'}")
    if failed:
        sys.exit(f"{failed} requests failed")


if __name__ == "__main__":
    main()
