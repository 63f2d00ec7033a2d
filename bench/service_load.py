"""The HTTP service under load and abuse: hundreds of concurrent requests, good and bad, and
stalled clients, against `cnnpipe serve` in its own process; then the batching service against
the unbatched one under `ab` (Debian's apache2-utils), and under overload.

usage: python bench/service_load.py [--model models/model.onnx] [--connections 300]
       python bench/service_load.py --tiny    # random weights, a few connections: the CI smoke test
Every request must get its expected answer (200 with predictions, or 413, 415, 400, 408), the
server must stay up, and its memory must stay bounded. Prints throughput as a ratio against one
client sending the same valid requests in turn, in the same run. Under `ab`, one JPEG per request,
the same model file is served unbatched (--workers 1 --max-batch 1 --http h11 --loop asyncio
--access-log: the service before batching) and batched (the defaults), in turn, at 4 and 64
clients.
"""

import argparse
import asyncio
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from cnnpipe.base.localhost import free_port, wait_for_http

MAX_BODY_MB = 1
BODY_TIMEOUT_S = 2


def png(rng: np.random.Generator, size: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def requests_mix(count: int) -> list[tuple[str, bytes, int]]:
    """(content type, body, expected status): 70% valid images of several sizes, 10% each of
    oversized bodies, wrong content types and corrupt images."""
    rng = np.random.default_rng(0)
    valid = [png(rng, size) for size in (32, 64, 224)]
    oversized = b"\x89PNG" + bytes(2 * MAX_BODY_MB << 20)
    corrupt = b"\x89PNG\r\n\x1a\n" + rng.bytes(2000)
    mix = []
    for i in range(count):
        kind = i % 10
        if kind == 7:
            mix.append(("image/png", oversized, 413))
        elif kind == 8:
            mix.append(("text/plain", b"hello", 415))
        elif kind == 9:
            mix.append(("image/png", corrupt, 400))
        else:
            mix.append(("image/png", valid[i % 3], 200))
    return mix


async def send(port: int, content_type: str, body: bytes) -> tuple[int, bytes, float]:
    """One request on its own connection: (status, response body, seconds); status 0 if the
    connection failed. Large bodies wait for "100 Continue" first, as curl does: a server that
    refuses the body answers at once instead of resetting a connection still sending it."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        expect = "Expect: 100-continue\r\n" if len(body) > 1 << 20 else ""
        head = (
            f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{expect}Connection: close\r\n\r\n"
        )
        writer.write(head.encode())
        response = b""
        if expect:
            response = await reader.readuntil(b"\r\n\r\n")
            if response.startswith(b"HTTP/1.1 100"):
                response = b""
        if not response:
            writer.write(body)
            await writer.drain()
        response += await reader.read()
        writer.close()
    except OSError:
        return 0, b"", time.perf_counter() - start
    status_line, _, rest = response.partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/1.1") else 0
    return status, rest.partition(b"\r\n\r\n")[2], time.perf_counter() - start


def correct(status: int, expected: int, body: bytes) -> bool:
    if status != expected:
        return False
    answer = json.loads(body)
    return "predictions" in answer if status == 200 else "error" in answer


async def wave(port: int, mix: list[tuple[str, bytes, int]]) -> tuple[float, int, list[float]]:
    """All requests at once, each on its own connection: (seconds, wrong answers, latencies)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(send(port, kind, body) for kind, body, _ in mix))
    seconds = time.perf_counter() - start
    wrong = sum(
        not correct(status, expected, body)
        for (status, body, _), (_, _, expected) in zip(results, mix, strict=True)
    )
    return seconds, wrong, [t for _, _, t in results]


async def in_turn(port: int, mix: list[tuple[str, bytes, int]]) -> tuple[float, int]:
    start = time.perf_counter()
    wrong = 0
    for kind, body, expected in mix:
        status, answer, _ = await send(port, kind, body)
        wrong += not correct(status, expected, answer)
    return time.perf_counter() - start, wrong


async def stalled_clients(port: int, count: int, valid: list) -> tuple[int, int, float]:
    """`count` clients that send headers and 4 bytes of a 5000-byte body, then stop, while
    valid requests go on: (stalled clients answered 408, valid requests answered wrongly,
    p99 latency of the valid requests in ms)."""

    async def stall() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = "POST /predict HTTP/1.1\r\nHost: b\r\nContent-Type: image/png\r\n"
        writer.write(f"{head}Content-Length: 5000\r\n\r\n".encode() + b"\x89PNG")
        response = await reader.read()
        writer.close()
        return int(response.split()[1]) if response else 0

    stalls = [asyncio.create_task(stall()) for _ in range(count)]
    await asyncio.sleep(0.2)
    latencies, wrong = [], 0
    for kind, body, expected in valid:
        status, answer, seconds = await send(port, kind, body)
        wrong += not correct(status, expected, answer)
        latencies.append(seconds * 1000)
    answered = await asyncio.gather(*stalls)
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]
    return sum(status == 408 for status in answered), wrong, p99


def memory_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of the service `pid` and its worker processes, summed."""
    now = peak = 0.0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status)
        now += int(fields["VmRSS"].split()[0]) / 1024
        peak += int(fields["VmHWM"].split()[0]) / 1024
    return now, peak


def need_ab() -> None:
    if not shutil.which("ab"):
        sys.exit("no ab here: install it with apt-get install apache2-utils")


def start_server(model: Path | str, port: int, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "cnnpipe.cli", "serve", str(model), "--port", str(port)]
    command += ["--max-body-mb", str(MAX_BODY_MB), "--body-timeout-s", str(BODY_TIMEOUT_S)]
    # uvicorn's access log goes to stdout, a line per request: never to an unread pipe. Its
    # stderr says why a server did not start.
    server = subprocess.Popen(
        [*command, *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, "the service", 30)
    except (RuntimeError, TimeoutError) as failure:
        server.kill()
        sys.exit(str(failure))
    return server


# The service before batching (one process, one model call per request, h11, asyncio's loop, a
# log line per request), and now: the same file served both ways.
SERVICES = {
    "unbatched": (
        "--workers", "1", "--max-batch", "1", "--http", "h11", "--loop", "asyncio", "--access-log"
    ),
    "batched": (),
}  # fmt: skip


def apache_bench(port: int, jpeg: Path, clients: int, requests: int) -> tuple[float, float, int]:
    """`ab` POSTing `jpeg` from `clients` at once: (requests/s, p99 ms, failed or not 200)."""
    command = ["ab", "-q", "-n", str(requests), "-c", str(clients), "-p", str(jpeg)]
    command += ["-T", "image/jpeg", f"http://127.0.0.1:{port}/predict"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600).stdout
    rate = float(re.search(r"Requests per second:\s+([\d.]+)", out)[1])
    p99 = float(re.search(r"^\s+99%\s+(\d+)", out, re.M)[1])
    failed = int(re.search(r"Failed requests:\s+(\d+)", out)[1])
    not_ok = re.search(r"Non-2xx responses:\s+(\d+)", out)
    return rate, p99, failed + (int(not_ok[1]) if not_ok else 0)


def under_ab(model: Path, jpeg: Path, requests: int) -> dict[str, dict[int, tuple]]:
    """Each service in SERVICES, alone on the machine, at 4 and 64 clients."""
    results: dict[str, dict[int, tuple]] = {}
    for name, options in SERVICES.items():
        port = free_port()
        server = start_server(model, port, *options)
        try:
            apache_bench(port, jpeg, 4, 100)  # warm-up
            results[name] = {c: apache_bench(port, jpeg, c, requests) for c in (4, 64)}
        finally:
            server.terminate()
            server.wait()
    return results


async def overload(port: int, body: bytes, count: int) -> tuple[int, int, int, float]:
    """`count` requests at once: (answered 200, answered 503, other, slowest 503 in ms)."""
    results = await asyncio.gather(*(send(port, "image/jpeg", body) for _ in range(count)))
    ok = sum(status == 200 for status, _, _ in results)
    busy = [seconds for status, _, seconds in results if status == 503]
    return ok, len(busy), count - ok - len(busy), max(busy, default=0) * 1000


def jpeg_file(folder: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = folder / "image.jpg"
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


def tiny_model(folder: Path) -> Path:
    from omegaconf import OmegaConf

    from cnnpipe.artifact.contract import Metadata
    from cnnpipe.artifact.onnx_export import export_onnx
    from cnnpipe.base.config import compose_params
    from cnnpipe.training.classifier import untrained
    from cnnpipe.training.inference import TorchModel

    cfg = OmegaConf.create(compose_params(conf_dir=Path(__file__).resolve().parents[1] / "conf"))
    names = [str(i) for i in range(10)]
    path = folder / "model.onnx"
    views = ("image", "mirror")
    model = TorchModel(untrained(names), views)
    metadata = Metadata(names, tta_views=views)
    export_onnx(model, path, metadata, cfg.export.opset, cfg.parity.atol, [1])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/model.onnx")
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--stalled", type=int, default=100)
    parser.add_argument("--ab-requests", type=int, default=2000)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    need_ab()
    connections, stalled = (20, 5) if args.tiny else (args.connections, args.stalled)
    ab_requests = 200 if args.tiny else args.ab_requests
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp)) if args.tiny else Path(args.model)
        jpeg = jpeg_file(Path(tmp))
        port = free_port()
        server = start_server(model, port)
        try:
            mix = requests_mix(connections)
            valid = [request for request in mix if request[2] == 200]
            asyncio.run(in_turn(port, valid[:10]))  # warm-up
            idle_mb, _ = memory_mb(server.pid)
            turn_s, turn_wrong = asyncio.run(in_turn(port, valid))
            waves = [asyncio.run(wave(port, mix)) for _ in range(3)]
            after_mb, peak_mb = memory_mb(server.pid)
            answered, stall_wrong, p99 = asyncio.run(stalled_clients(port, stalled, valid[:50]))
            final_mb, peak_mb = memory_mb(server.pid)
            up = urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200
        finally:
            server.terminate()
            server.wait()
        ab = under_ab(model, jpeg, ab_requests)
        port = free_port()
        server = start_server(model, port, "--max-queue", "8")
        try:
            ok, busy, other, slowest_503 = asyncio.run(overload(port, jpeg.read_bytes(), 200))
        finally:
            server.terminate()
            server.wait()

    turn_rate = len(valid) / turn_s
    print(
        f"\none client, {len(valid)} valid requests in turn: {turn_rate:.0f} requests/s, "
        f"{turn_wrong} wrong"
    )
    for i, (seconds, wrong, latencies) in enumerate(waves, 1):
        rate = len(mix) / seconds
        p99_ms = statistics.quantiles(latencies, n=100)[98] * 1000
        print(
            f"wave {i}: {len(mix)} connections at once (70% valid, 10% each 413/415/400): "
            f"{rate:.0f} requests/s = {rate / turn_rate:.2f}x one client, p99 {p99_ms:.0f} ms, "
            f"{wrong} wrong or failed"
        )
    print(
        f"{stalled} stalled clients: {answered} answered 408 after {BODY_TIMEOUT_S} s; "
        f"meanwhile {len(valid[:50])} valid requests, {stall_wrong} wrong, p99 {p99:.0f} ms"
    )
    print(
        f"server memory: {idle_mb:.0f} MB idle, {after_mb:.0f} MB after the waves, "
        f"{final_mb:.0f} MB at the end, peak {peak_mb:.0f} MB; still up: {up}"
    )
    for clients in (4, 64):
        (old, old_p99, old_bad), (new, new_p99, new_bad) = (ab[s][clients] for s in SERVICES)
        print(
            f"ab, {clients} clients, {ab_requests} JPEG requests: unbatched {old:.0f} requests/s "
            f"(p99 {old_p99:.0f} ms), batched {new:.0f} requests/s (p99 {new_p99:.0f} ms) = "
            f"{new / old:.2f}x; {old_bad + new_bad} failed or not 200"
        )
    print(
        f"overload, 200 requests at once, --max-queue 8: {ok} answered 200, {busy} answered 503 "
        f"(the slowest in {slowest_503:.0f} ms), {other} otherwise"
    )
    failures = turn_wrong + sum(w for _, w, _ in waves) + stall_wrong + (stalled - answered)
    failures += sum(bad for by_clients in ab.values() for _, _, bad in by_clients.values())
    failures += other
    if failures or not up:
        sys.exit(f"{failures} requests were answered wrongly or not at all")


if __name__ == "__main__":
    main()
