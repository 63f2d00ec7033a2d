"""What a person sees in the MLflow UI, in a real headless browser (Debian's chromium driven by
Playwright) against a real `mlflow server` on a store filled by a pipeline run and a sweep."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cnnpipe import cli
from cnnpipe.base.config import compose_params
from cnnpipe.tracking.stage_run import read_run_id
from cnnpipe.tracking.store import MODEL_TRAINING
from tests.helpers import store
from tests.mlflow_ui import (
    CHROMIUM,
    as_a_newcomer,
    browser,
    compare,
    logged_models,
    mlflow_server,
    model_metrics_as_opened,
    open_runs,
    params_shown_with_diff_only,
    val_acc_chart,
)


@pytest.mark.slow
def test_runs_read_named_charted_on_epochs_and_compared_by_their_real_differences(project, capsys):
    assert Path(CHROMIUM).is_file(), "install the browser: apt-get install chromium"
    repo, tiny = project
    keep_int8 = ["quantize.max_accuracy_drop=1.0", "quantize.min_speedup=0"]
    (repo / "params.yaml").write_text(compose_params([*tiny, *keep_int8], conf_dir=repo / "conf"))
    for stage in ("train", "evaluate", "export", "parity", "quantize"):
        cli.main([stage])
    said = capsys.readouterr().out
    cnnpipe = Path(sys.executable).parent / "cnnpipe"
    sweep = subprocess.run(
        [str(cnnpipe), "train", "--multirun", "optim.lr=1e-3,3e-3", *tiny, *keep_int8],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    client = store(repo)
    pipeline = client.get_run(read_run_id(repo / "models/mlflow_run.json"))
    experiment = pipeline.info.experiment_id
    child = next(
        r
        for r in client.search_runs([experiment])
        if r.data.tags.get("sweep.overrides", "").startswith("optim.lr=0.001")
    )

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    with mlflow_server(uri) as base:
        # Each stage ends with its run's link; someone who never used the UI follows it.
        links = re.findall(
            r"^MLflow: (\S+) \(after: mlflow ui --backend-store-uri (\S+)\)$", said, re.M
        )
        assert len(links) == 5 and set(links) == {(links[0][0], uri)}
        link = links[0][0].replace("http://127.0.0.1:5000", base)
        seen = as_a_newcomer(link, pipeline.info.run_name)
        assert seen["url"] == link
        assert "Models" in seen["links"] and "Evaluation runs" not in seen["links"]
        # The experiment's link as docs/tracking.md gives it (the store's first experiment).
        assert experiment == "1"
        seen = as_a_newcomer(f"{base}/#/experiments/1?{MODEL_TRAINING}", pipeline.info.run_name)
        assert "/runs?" in seen["url"] and "Evaluation runs" not in seen["links"]
        # Without the link's ask, the same page opens in MLflow's GenAI views.
        seen = as_a_newcomer(link.split("?")[0], pipeline.info.run_name)
        assert "Evaluation runs" in seen["links"] and "Models" not in seen["links"]
        # The registered version as docs/tracking.md links it: in Model training views. MLflow's
        # own link to it, on the run's page, lacks the ask and opens the GenAI views.
        version = f"{base}/#/models/cnnpipe-cifar10/versions/1"
        seen = as_a_newcomer(f"{version}?{MODEL_TRAINING}", pipeline.info.run_name)
        assert "Model registry" in seen["links"] and "Prompts" not in seen["links"]
        seen = as_a_newcomer(version, pipeline.info.run_name)
        assert "Prompts" in seen["links"] and "Model registry" not in seen["links"]

        with browser() as page:
            names = open_runs(page, base, experiment)
            assert (
                pipeline.info.run_name == "ChapterCNN 2 epochs" and pipeline.info.run_name in names
            )
            assert any(name.startswith("sweep: optim.lr=1e-3,3e-3") for name in names)

            # The tab opens on the curves, train's then val's, drawn over the epochs; the single
            # numbers (names with a dot) come after them, in MLflow's "Model metrics" section.
            opened = model_metrics_as_opened(page, base, experiment, pipeline.info.run_id)
            assert opened["sections"] == ["train", "val", "Model metrics"]
            curves = [("train", "acc"), ("train", "loss"), ("val", "acc"), ("val", "loss")]
            assert opened["charts"][:4] == [(*curve, "line") for curve in curves]

            # Searched for val/acc: one chart, its points on epochs 1..2 (not steps: no staircase).
            chart = val_acc_chart(page, base, experiment, pipeline.info.run_id)
            assert chart["charts"] == 1 and chart["x_title"] == "Step"
            assert chart["points"] == 2
            assert min(chart["x_ticks"]) >= 1 and max(chart["x_ticks"]) <= 2

            # Each logged model's row shows its own results on the test set, test accuracy first.
            parity = json.loads((repo / "metrics/parity.json").read_text())
            int8 = json.loads((repo / "metrics/quantize.json").read_text())
            shown = logged_models(page, base, experiment)
            want = {
                "ChapterCNN-onnx": {
                    "test.acc": parity["parity.onnx_test_acc"],
                    "parity.max_abs_diff": parity["parity.max_abs_diff"],
                    "parity.top1_agreement": parity["parity.top1_agreement"],
                },
                "ChapterCNN-onnx-int8": {
                    key: int8[key]
                    for key in ("int8.test_acc", "int8.accuracy_drop", "int8.speedup")
                },
            }
            assert {m: set(cols) for m, cols in shown.items()} == {
                m: {f"{key} @ cifar10-test" for key in keys} for m, keys in want.items()
            }
            for model, results in want.items():
                for key, value in results.items():
                    assert float(shown[model][f"{key} @ cifar10-test"]) == pytest.approx(value)

            # "Show diff only" leaves exactly the keys whose values differ: the learning rate.
            compare(page, base, experiment, [pipeline.info.run_name, child.info.run_name])
            a, b = pipeline.data.params, child.data.params
            differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
            assert differ == {"optim.lr"}
            runs = {pipeline.info.run_id: a, child.info.run_id: b}
            assert params_shown_with_diff_only(page, runs) == differ
