"""What `cnnpipe serve --capture` costs a loaded service: the same model file served without
capture and with it (default threshold and share), in turn, under `ab` (Debian's apache2-utils)
at 64 clients, one JPEG per request, several rounds each.

usage: python bench/capture_load.py [--model models/model.onnx] [--rounds 3]
       python bench/capture_load.py --tiny    # random weights, short rounds: the CI smoke test

Target: with capture, at least 0.95x the requests/s without it (the median round of each), and
no failed request. A random model is unsure of every image, so under --tiny every request is
offered to capture: more than a trained model's share.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from service_load import apache_bench, jpeg_file, need_ab, start_server, tiny_model

from cnnpipe.base.localhost import free_port

TARGET = 0.95


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
    off, on, failed = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = tiny_model(folder) if args.tiny else Path(args.model)
        jpeg = jpeg_file(folder)
        for i in range(rounds):
            rate, _, bad = rates(model, jpeg, requests)
            off.append(rate)
            failed += bad
            rate, _, bad = rates(model, jpeg, requests, "--capture", str(folder / f"kept{i}"))
            on.append(rate)
            failed += bad
        kept = sum(len(list(folder.glob(f"kept{i}/*.jpg"))) for i in range(rounds))
    ratio = statistics.median(on) / statistics.median(off)
    print(f"ab, 64 clients, {requests} JPEG requests a round, {rounds} round(s) each:")
    print(f"without capture: {', '.join(f'{r:.0f}' for r in off)} requests/s")
    print(f"with capture:    {', '.join(f'{r:.0f}' for r in on)} requests/s ({kept} image(s) kept)")
    verdict = "met" if ratio >= TARGET and not failed else "MISSED"
    print(
        f"with / without: {ratio:.3f} (target >= {TARGET}); {failed} failed or not 200: {verdict}"
    )
    if failed:
        sys.exit(f"{failed} requests failed")


if __name__ == "__main__":
    main()
