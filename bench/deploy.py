"""Deployment speed: onnxruntime FP32 vs PyTorch eager, INT8 vs FP32, the cost of the test-time
views, and the HTTP service.

usage: python bench/deploy.py [--model models/model.onnx] [--int8 models/int8/model.onnx]
       python bench/deploy.py --views [--data data/prepared]   # also: views x precision table
       python bench/deploy.py --tiny      # random weights, seconds: the CI smoke test
The ONNX file and the checkpoint are the pipeline's outputs (`dvc repro`). The INT8 model is the
quantize stage's, or, where the stage dropped it, made here the same way (calibrated on the
benchmark's random batch, which changes its accuracy, not its speed). With --tiny a random network
is exported to a temporary folder instead. The test-time views' cost: the same network exported
without them, side by side. --views exports the checkpoint with 1, 2, 6 and the default's test-time
views, each in FP32 and INT8 (quantized as the quantize stage does it), and prints each one's
images/s at batch 256 and test accuracy as deployed. The service is measured unbatched (one model
call per request, h11: the service before batching) and batched. Everything is measured in this one
process.
"""

import argparse
import concurrent.futures
import io
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import console
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from cnnpipe.artifact.contract import Metadata, input_shape
from cnnpipe.artifact.onnx_export import export_onnx
from cnnpipe.artifact.quantization import accuracy, calibration_images, images_per_second, quantize
from cnnpipe.base.config import compose_params
from cnnpipe.base.schema import TTA_VIEWS
from cnnpipe.data.loader import read_split
from cnnpipe.data.prepared import write_random
from cnnpipe.serving.app import Limits, create_app
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.serving.server import running
from cnnpipe.training.classifier import load_checkpoint, untrained
from cnnpipe.training.inference import TorchModel, describe_tta, nhwc


def latency_ms(run, image: np.ndarray, count: int) -> tuple[float, float]:
    for _ in range(20):
        run(image)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        run(image)
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=100)
    return q[49], q[98]


# The service before batching (one model call per request, h11) and now.
SERVICES = {"unbatched": (Limits(max_batch=1), "h11"), "batched": (Limits(), "httptools")}


def service(
    model: Path, image: bytes, requests: int, clients: int, limits: Limits, parser: str
) -> tuple[float, float, int]:
    """Requests/s, p99 latency (ms) and failures for single-image POSTs from `clients` threads."""

    def one(_: int) -> float | None:
        request = urllib.request.Request(url, data=image, headers={"Content-Type": "image/png"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                json.loads(response.read())
        except OSError:
            return None
        return (time.perf_counter() - start) * 1000

    with running(create_app(str(model), limits), parser=parser) as base:
        url = f"{base}/predict"
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            times = list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - start
    ok = [t for t in times if t is not None]
    return len(ok) / seconds, statistics.quantiles(ok, n=100)[98], len(times) - len(ok)


# Besides the default's views (conf: evaluate.tta), each moved by 1 pixel where it is moved.
VIEWS = [("image",), ("image", "mirror"), TTA_VIEWS]


def views_table(cfg, classifier, names: list[str], folder: Path, rounds: int) -> list[tuple]:
    """(views, precision, images/s at batch 256, test accuracy) for the default's views and each
    of VIEWS in FP32 and INT8, all timed in turn in this process."""
    test_images, test_labels = read_split(cfg, "test")
    images, labels = nhwc(test_images).numpy(), test_labels.numpy()
    calibration = calibration_images(cfg)
    runs, rows = {}, []
    default = tuple(cfg.evaluate.tta.views)
    every = sorted({*VIEWS, default}, key=lambda views: (len(views), views))
    for i, views in enumerate(every):
        model = TorchModel(classifier, views)
        metadata = Metadata(names, tta_views=views)
        fp32, int8 = folder / f"views{i}.onnx", folder / f"views{i}.int8.onnx"
        export_onnx(model, fp32, metadata, cfg.export.opset, cfg.parity.atol, [1])
        quantize(model, int8, calibration, metadata, cfg.export.opset, cfg.parity.atol)
        label = describe_tta(views, 1)
        for precision, path in (("FP32", fp32), ("INT8", int8)):
            run = OnnxModel.load(path).probabilities
            runs[(label, precision)] = run
            rows.append((label, precision, accuracy(run, images, labels)))
    rates = images_per_second(runs, images[:256], rounds)
    return [(views, precision, rates[(views, precision)], acc) for views, precision, acc in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/model.onnx")
    parser.add_argument("--int8", default="models/int8/model.onnx")
    parser.add_argument("--checkpoint", default="models/model.ckpt")
    parser.add_argument("--views", action="store_true")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, input_shape(256, (32, 32)), dtype=np.uint8)
    rounds, count, requests = (9, 1000, 400) if not args.tiny else (1, 30, 20)
    # Exported and checked as the pipeline does it (conf/).
    cfg = OmegaConf.create(compose_params(conf_dir=Path(__file__).resolve().parents[1] / "conf"))
    opset, atol = cfg.export.opset, cfg.parity.atol
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            names = [str(i) for i in range(10)]
            torch_model = TorchModel(untrained(names), TTA_VIEWS)
            model, int8 = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
            metadata = Metadata(names, tta_views=TTA_VIEWS)
            export_onnx(torch_model, model, metadata, opset, atol, [1])
        else:
            model, int8 = Path(args.model), Path(args.int8)
        fp32 = OnnxModel.load(model)
        metadata = fp32.metadata
        if not args.tiny:
            # Eager PyTorch computes the views the model was exported with.
            views, shift = metadata.tta_views, metadata.tta_shift
            torch_model = TorchModel(load_checkpoint(args.checkpoint), views, shift)
        if not int8.is_file():
            int8 = Path(tmp) / "int8.onnx"
            quantize(torch_model, int8, batch[:64], metadata, opset, atol)
        one_view = Path(tmp) / "one_view.onnx"
        export_onnx(TorchModel(torch_model.classifier), one_view, metadata, opset, atol, [1])

        q8 = OnnxModel.load(int8)

        @torch.inference_mode()
        def eager(x: np.ndarray) -> torch.Tensor:
            # TorchModel's permute() of NHWC data is a channels_last view: PyTorch's fastest CPU
            # layout.
            return torch_model(torch.from_numpy(x))

        @torch.inference_mode()
        def eager_nchw(x: np.ndarray) -> torch.Tensor:
            # The same images laid out NCHW in memory.
            nchw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
            return torch_model(nchw.permute(0, 2, 3, 1))

        runs = {
            "pytorch eager": eager,
            "pytorch eager NCHW": eager_nchw,
            "onnxruntime fp32": fp32.probabilities,
            "onnxruntime int8": q8.probabilities,
            "onnxruntime fp32 1 view": OnnxModel.load(one_view).probabilities,
        }
        rates = images_per_second(runs, batch, rounds)
        lat = {
            name: latency_ms(run, batch[:1], count)
            for name, run in (("pytorch eager", eager), ("onnxruntime fp32", fp32.probabilities))
        }
        png = io.BytesIO()
        Image.fromarray(batch[0]).save(png, format="PNG")
        table = []
        if args.views:
            cfg.paths.data = args.data
            if args.tiny:
                cfg.paths.data = str(Path(tmp) / "data")
                write_random(Path(cfg.paths.data), 256, 256)
            table = views_table(
                cfg, torch_model.classifier, metadata.class_names, Path(tmp), rounds
            )
        served = {
            name: service(model, png.getvalue(), requests, 4, limits, parser)
            for name, (limits, parser) in SERVICES.items()
        }

    fp32_rate, int8_rate = rates["onnxruntime fp32"], rates["onnxruntime int8"]
    tta = describe_tta(torch_model.views, torch_model.shift)
    print(f"\nbatch 256, {tta}, {torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"  {name:>18}: {rate:9.0f} images/s")
    print(
        f"onnxruntime fp32 / pytorch eager = {fp32_rate / rates['pytorch eager']:.2f}  (goal >= 2)"
    )
    print(f"onnxruntime fp32 / eager NCHW    = {fp32_rate / rates['pytorch eager NCHW']:.2f}")
    print(f"onnxruntime int8 / fp32          = {int8_rate / fp32_rate:.2f}  (goal >= 1.5)")
    one = rates["onnxruntime fp32 1 view"]
    print(f"onnxruntime fp32 / fp32 1 view   = {fp32_rate / one:.2f}  (the cost of {tta})")
    for name, (p50, p99_) in lat.items():
        print(f"batch 1 latency {name:>17}: p50 {p50:.3f} ms, p99 {p99_:.3f} ms")
    for name, (rps, p99, failed) in served.items():
        print(
            f"service {name:>9}, 4 clients, {requests} single-image requests: "
            f"{rps:.0f} requests/s, p99 {p99:.1f} ms, {failed} failed"
        )
    ratio = served["batched"][0] / served["unbatched"][0]
    print(f"service batched / unbatched      = {ratio:.2f}")
    if table:
        print(f"\n{'':4} {'images/s':>9} {'test acc':>8}  test-time views")
        for views, precision, rate, acc in table:
            print(f"{precision:4} {rate:9.0f} {acc:8.2%}  {views}")


if __name__ == "__main__":
    console.run(main)
