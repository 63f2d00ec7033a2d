"""The benchmarks run on tiny random data, so that they cannot rot between real measurements."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def run_bench(name: str, tmp_path: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), "--tiny"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_throughput_prints_both_ratios(tmp_path):
    out = run_bench("throughput.py", tmp_path)
    rates = dict(re.findall(r"^\s*(plain|project|tutorial):\s+(\d+) images/s", out, re.M))
    assert set(rates) == {"plain", "project", "tutorial"} and all(
        int(v) > 0 for v in rates.values()
    )
    ratio = float(re.search(r"project / plain\s+= ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(int(rates["project"]) / int(rates["plain"]), rel=0.01)
    assert re.search(r"project / tutorial = [\d.]+", out)


def test_time_to_accuracy_prints_a_curve_and_the_test_accuracy(tmp_path):
    out = run_bench("time_to_accuracy.py", tmp_path)
    epochs = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [e[0] for e in epochs] == ["1", "2"]
    assert float(epochs[1][2]) >= float(epochs[0][2]), "training time only grows"
    assert re.search(r"test/acc [\d.]+ \(tta_flip=True\), training \d+ s", out)
    assert re.search(r"peak memory \d+ MB", out)


def test_deploy_benchmark_prints_every_figure(tmp_path):
    out = run_bench("deploy.py", tmp_path)
    for name in ("pytorch eager", "onnxruntime fp32", "onnxruntime int8"):
        assert re.search(rf"{name}:\s+\d+ images/s", out), name
    assert re.search(r"onnxruntime fp32 / pytorch eager = [\d.]+", out)
    assert re.search(r"onnxruntime int8 / fp32\s+= [\d.]+", out)
    assert re.search(r"onnxruntime fp32: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"\d+ requests/s, p99 [\d.]+ ms, 0 failed", out)


def test_service_load_answers_every_request_and_reports_memory(tmp_path):
    out = run_bench("service_load.py", tmp_path)
    waves = re.findall(
        r"^wave \d: 20 connections .* = [\d.]+x one client, .* (\d+) wrong", out, re.M
    )
    assert waves == ["0", "0", "0"]
    assert re.search(r"5 stalled clients: 5 answered 408 .* 0 wrong", out)
    assert re.search(r"server memory: \d+ MB idle, .* peak \d+ MB; still up: True", out)
