"""The benchmarks run on tiny random data, so that they cannot rot between real measurements."""

import json
import os
import re
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnpipe.cli import COMMANDS
from tests.helpers import ROOT


def test_every_bench_imports_what_it_uses_of_the_core(monkeypatch):
    """The fast tier's guard for the benches, which run whole in the slow tier: a core name a
    bench imports and a change renamed fails here."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    for path in sorted((ROOT / "bench").glob("*.py")):
        runpy.run_path(str(path))  # its imports and definitions; main() runs in the slow tier


def run_bench(name: str, tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), "--tiny", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # stdout names the part that failed; stderr has the traceback or the exit message.
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_throughput_prints_both_ratios(tmp_path):
    out = run_bench("throughput.py", tmp_path, "--profile")
    rates = dict(re.findall(r"^\s*(plain|project|tutorial):\s+(\d+) images/s", out, re.M))
    assert set(rates) == {"plain", "project", "tutorial"} and all(
        int(v) > 0 for v in rates.values()
    )
    ratio = float(re.search(r"project / plain\s+= ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(int(rates["project"]) / int(rates["plain"]), rel=0.01)
    assert re.search(r"project / tutorial = [\d.]+", out)
    # --profile: each loop's step splits into torch's operators and the Python around them.
    split = re.findall(r"^\s*(plain|project)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [name for name, *_ in split] == ["plain", "project"]
    for _, step, operators, python in split:
        assert float(operators) > 0 and float(python) >= 0
        assert float(step) == pytest.approx(float(operators) + float(python), abs=0.011)


@pytest.mark.slow
def test_step_profile_puts_the_convolutions_against_the_cpus_peak(tmp_path):
    out = run_bench("step_profile.py", tmp_path)
    # The chapter CNN's convolutions at --tiny's batch of 32, recomputed: each one's forward and
    # weight gradient, and the input gradient of all but the first (its input is the image).
    forward = [2 * 32 * 30 * 30 * 32 * 27, 2 * 32 * 13 * 13 * 64 * 288, 2 * 32 * 4 * 4 * 64 * 576]
    flops = 2 * sum(forward) + sum(forward[1:])
    found = re.search(
        r"convolutions: ([\d.]+) GFLOP in ([\d.]+) ms = (\d+) GFLOP/s; "
        r"a 256x256 matmul in (?:bfloat16|float32): (\d+) GFLOP/s",
        out,
    )
    gflop, ms, rate, peak = float(found[1]), float(found[2]), int(found[3]), int(found[4])
    assert gflop == round(flops / 1e9, 2)
    assert flops / (ms + 0.05) / 1e6 - 1 <= rate <= flops / (ms - 0.05) / 1e6 + 1
    step = float(re.search(r"a training step: ([\d.]+) ms", out)[1])
    ideal, bound = map(float, re.search(r"take ([\d.]+) ms: bound = ([\d.]+)x", out).groups())
    assert ideal == pytest.approx(flops / peak / 1e6, abs=0.05 + 0.01 * ideal)
    # Each printed to 0.1 ms; the bound to 0.01.
    assert (step - 0.05) / (ideal + 0.05) - 0.01 <= bound <= (step + 0.05) / (ideal - 0.05) + 0.01
    # The table's rows are the step's operators, largest first; the convolutions among them.
    rows = re.findall(r"^(aten::\S+|\S+#\S+).* ([\d.]+) +(\d+)%$", out, re.M)
    assert any("convolution" in name for name, *_ in rows)
    times = [float(t) for _, t, _ in rows]
    assert times == sorted(times, reverse=True)


def test_prepare_times_a_full_and_an_incremental_decode(tmp_path):
    out = run_bench("prepare.py", tmp_path)
    found = re.search(r"full decode: ([\d,]+) images in ([\d.]+) s, ([\d,]+) images/s", out)
    n, full, rate = int(found[1].replace(",", "")), float(found[2]), int(found[3].replace(",", ""))
    assert n == 300
    # The seconds are printed to 0.01 s: the rate lies between those the rounding allows.
    assert 300 / (full + 0.005) - 1 <= rate <= 300 / max(full - 0.005, 1e-9) + 1
    again, ratio = map(
        float, re.search(r"20 added: ([\d.]+) s; full / incremental: ([\d.]+)x", out).groups()
    )
    assert (
        (full - 0.005) / (again + 0.005) - 0.05
        <= ratio
        <= (full + 0.005) / max(again - 0.005, 1e-9) + 0.05
    )
    assert "decoded 40 of 320 images" in out


@pytest.mark.slow
def test_time_to_accuracy_compares_the_recipes_epoch_by_epoch(tmp_path):
    # Any accuracy reaches 0%: the first epoch is the one to report, with its own time.
    out = run_bench("time_to_accuracy.py", tmp_path, "--target", "0")
    runs = re.findall(r"^(old|new): (.*)\nepoch .*\n((?:\s+\d+ .*\n)+)", out, re.M)
    assert [r[0] for r in runs] == ["new", "old"]
    assert "optim.whiten" not in runs[0][1] and "optim.whiten=false" in runs[1][1]
    summary = dict(re.findall(r"^(old|new) +(\d+ +[\d.]+ +\d+ +\d+ +\d+)$", out, re.M))
    for name, _, table in runs:
        rows = [line.split() for line in table.splitlines()]
        assert [r[0] for r in rows] == ["1", "2"]
        assert float(rows[1][3]) >= float(rows[0][3]), "training time only grows"
        epochs, test_acc, _, to_target, seconds = summary[name].split()
        assert (epochs, to_target) == ("2", "1")
        assert abs(int(seconds) - float(rows[0][3])) <= 0.55, "the first epoch's time"
    assert re.search(r"new / old: 1.00x the epochs, [\d.]+x the seconds", out)


@pytest.mark.slow
def test_time_to_accuracy_compares_the_default_against_a_change(tmp_path):
    out = run_bench("time_to_accuracy.py", tmp_path, "--target", "0", "--against", "seed=7")
    headers = dict(re.findall(r"^(old|new): (.*)$", out, re.M))
    assert headers["new"].split() == [*headers["old"].split(), "seed=7"]
    assert "trainer.max_epochs=35" not in out, "not the previous recipe"
    assert re.search(r"new / old: 1.00x the epochs, [\d.]+x the seconds", out)


@pytest.mark.slow
def test_deploy_benchmark_prints_every_figure(tmp_path):
    out = run_bench("deploy.py", tmp_path, "--views")
    for name in ("pytorch eager", "onnxruntime fp32", "onnxruntime int8"):
        assert re.search(rf"{name}:\s+\d+ images/s", out), name
    assert re.search(r"onnxruntime fp32 / pytorch eager = [\d.]+", out)
    assert re.search(r"onnxruntime int8 / fp32\s+= [\d.]+", out)
    rates = dict(re.findall(r"^\s*(onnxruntime fp32|onnxruntime fp32 1 view):\s+(\d+)", out, re.M))
    cost = float(re.search(r"fp32 / fp32 1 view\s+= ([\d.]+)  \(the cost of 6 test-time", out)[1])
    ratio = int(rates["onnxruntime fp32"]) / int(rates["onnxruntime fp32 1 view"])
    assert cost == pytest.approx(ratio, abs=0.01)
    assert re.search(r"onnxruntime fp32: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    served = re.findall(
        r"^service +(\w+), 4 clients, .*: (\d+) requests/s, p99 [\d.]+ ms, 0 failed", out, re.M
    )
    assert [name for name, _ in served] == ["unbatched", "batched"]
    ratio = float(re.search(r"service batched / unbatched\s+= ([\d.]+)", out)[1])
    assert ratio == pytest.approx(int(served[1][1]) / int(served[0][1]), abs=0.01)
    table = re.findall(r"^(FP32|INT8) +\d+ +[\d.]+%  (\d+|no) test-time ", out, re.M)
    views = [(count, precision) for precision, count in table]
    assert views == [(n, p) for n in ("no", "2", "3", "6") for p in ("FP32", "INT8")]


@pytest.mark.slow
def test_service_load_answers_every_request_and_reports_memory(tmp_path):
    out = run_bench("service_load.py", tmp_path)
    waves = re.findall(
        r"^wave \d: 20 connections .* = [\d.]+x one client, .* (\d+) wrong", out, re.M
    )
    assert waves == ["0", "0", "0"]
    assert re.search(r"5 stalled clients: 5 answered 408 .* 0 wrong", out)
    assert re.search(r"server memory: \d+ MB idle, .* peak \d+ MB; still up: True", out)
    for clients in (4, 64):
        ab = re.search(
            rf"^ab, {clients} clients, 200 JPEG requests: unbatched (\d+) requests/s .* batched "
            r"(\d+) requests/s .* = ([\d.]+)x; 0 failed or not 200",
            out,
            re.M,
        )
        assert ab, f"ab at {clients} clients"
        assert float(ab[3]) == pytest.approx(int(ab[2]) / int(ab[1]), abs=0.01)
    overload = re.search(
        r"--max-queue 8: (\d+) answered 200, (\d+) answered 503 .* 0 otherwise", out
    )
    assert overload and int(overload[1]) >= 8 and int(overload[1]) + int(overload[2]) == 200


# What the GPU machine lacks (bench/gpu_check.sh): the GPU check must run without them.
NOT_ON_THE_GPU_MACHINE = ["mlflow", "dvc", "sqlalchemy", "optuna", "starlette", "uvicorn"]
WITHOUT = """
import runpy, sys

class NotThere:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {missing}:
            raise ImportError(f"no module named {{name}} on the GPU machine")

sys.meta_path.insert(0, NotThere())
sys.argv = ["bench/gpu_check.py", *{args}]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_says_in_one_line_that_there_is_no_gpu():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False); run it on a machine "
        "with an NVIDIA GPU\n"
    )


@pytest.mark.slow
def test_gpu_check_runs_its_steps_on_the_cpu_without_mlflow_or_dvc(data_dir, tmp_path):
    report = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--data", str(data_dir), "--json", str(report), "--target", "0",
            "trainer.max_epochs=1", "data.val_size=40", "loader.batch_size=64"]  # fmt: skip
    script = WITHOUT.format(missing=NOT_ON_THE_GPU_MACHINE, args=args)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    # stdout names the part that failed; stderr has the traceback or the exit message.
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(report.read_text())
    chapter, resnet = figures["chapter_cnn"], figures["resnet9"]
    # 160 training images, one epoch each.
    for run in (chapter, resnet):
        assert run["epochs"] == 1
        assert run["images_per_s"] == pytest.approx(160 / run["seconds"])
    assert chapter["parity_top1_agreement"] == 1.0 and chapter["parity_max_abs_diff"] <= 1e-5
    (epoch,) = resnet["per_epoch"]
    assert resnet["test_acc"] == epoch["acc"] and resnet["seconds"] == epoch["seconds"]
    # Any accuracy reaches 0%: at the first epoch, with its time.
    assert (resnet["epochs_to_target"], resnet["seconds_to_target"]) == (1, epoch["seconds"])
    out = result.stdout
    assert f"test accuracy {chapter['test_acc']:.2%}; ONNX parity" in out
    assert f"ResNet-9: 1 epochs in {resnet['seconds']:.1f} s" in out
    assert f"0% after 1 epochs, {epoch['seconds']:.1f} s" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, missing",
    [
        ("throughput.py", "--data=nowhere"),
        ("step_profile.py", "--data=nowhere"),
        ("time_to_accuracy.py", "--data=nowhere"),
        ("deploy.py", "--model=nowhere.onnx"),
    ],
)
def test_a_bench_without_the_pipelines_outputs_says_so_in_one_line(tmp_path, name, missing):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), missing],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"{name}: error: ") and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_startup_times_every_answer_against_the_lightning_import(tmp_path):
    out = run_bench("cli_startup.py", tmp_path)
    baseline = float(re.search(r"^import pytorch_lightning: (\d+\.\d\d) s", out, re.M)[1])
    rows = re.findall(r"^(\S.*?) +(\d+\.\d\d) +(\d+\.\d\d)$", out, re.M)
    stages = [c for c in COMMANDS if c not in ("params", "predict", "serve", "review")]
    assert [r[0] for r in rows] == [
        *(f"{c} --help" for c in COMMANDS),
        *(f"{s} (bad params.yaml)" for s in stages),
        "train optim.lr=fast",
    ]
    for _, seconds, ratio in rows:
        assert float(ratio) == pytest.approx(float(seconds) / baseline, abs=0.01)
    # The slowest by the unrounded times: one of the rows that print the largest.
    name, seconds = re.search(r"^slowest: (.+), (\d+\.\d\d) s = ", out, re.M).groups()
    assert float(seconds) == max(float(r[1]) for r in rows)
    assert (name, seconds) in [(r[0], r[1]) for r in rows]


@pytest.mark.slow
def test_capture_load_compares_the_service_with_and_without_capture_and_drift(tmp_path):
    out = run_bench("capture_load.py", tmp_path)

    def median(name: str) -> float:
        rates = re.search(rf"^{name}: +([\d, ]+) requests/s", out, re.M)[1].split(",")
        return statistics.median(float(r) for r in rates)

    capture = float(re.search(r"capture, with / without: (\d+\.\d+)", out)[1])
    drift = float(re.search(r"drift gauges, on / off: (\d+\.\d+)", out)[1])
    # The printed rates are rounded to whole requests/s.
    want = median("with capture") / median("without capture")
    assert capture == pytest.approx(want, abs=0.002)
    want = median("without capture") / median("without drift gauges")
    assert drift == pytest.approx(want, abs=0.002)
    assert "kept with capture: 1 image(s)" in out and "\n0 failed or not 200: " in out


@pytest.mark.slow
def test_swap_load_moves_the_alias_under_load_without_a_failed_request(tmp_path):
    out = run_bench("swap_load.py", tmp_path)
    total = int(re.search(r"ab, 16 clients, (\d+) JPEG requests; @champion moved", out)[1])
    during, others = map(int, re.search(r"p99 of the (\d+) .* of the (\d+) others", out).groups())
    assert during > 0 and during + others == total
    assert "\n0 failed or not 200 (target 0): met" in out
