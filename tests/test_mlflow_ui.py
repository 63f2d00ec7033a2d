"""What a person sees in the MLflow UI, in a real headless browser (Debian's chromium driven by
Playwright) against a real `mlflow server` on a store filled by a pipeline run and a sweep."""

import subprocess
import sys
from pathlib import Path

import pytest

from cnnpipe import cli
from cnnpipe.tracking import read_run_id
from tests.helpers import store
from tests.mlflow_ui import (
    CHROMIUM,
    browser,
    compare,
    mlflow_server,
    open_runs,
    params_shown_with_diff_only,
    val_acc_chart,
)


@pytest.mark.slow
def test_runs_read_named_charted_on_epochs_and_compared_by_their_real_differences(project):
    assert Path(CHROMIUM).is_file(), "install the browser: apt-get install chromium"
    repo, tiny = project
    cli.main(["train"])
    cli.main(["evaluate"])
    cnnpipe = Path(sys.executable).parent / "cnnpipe"
    sweep = subprocess.run(
        [str(cnnpipe), "train", "--multirun", "optim.lr=1e-3,3e-3", *tiny],
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

    with mlflow_server(f"sqlite:///{repo / 'mlflow.db'}") as base, browser() as page:
        names = open_runs(page, base, experiment)
        assert pipeline.info.run_name == "ChapterCNN 2 epochs" and pipeline.info.run_name in names
        assert any(name.startswith("sweep: optim.lr=1e-3,3e-3") for name in names)

        # One val/acc chart, its points on epochs 1..2: not optimizer steps, no staircase.
        chart = val_acc_chart(page, base, experiment, pipeline.info.run_id)
        assert chart["charts"] == 1 and chart["x_title"] == "Step"
        assert chart["points"] == 2
        assert min(chart["x_ticks"]) >= 1 and max(chart["x_ticks"]) <= 2

        # "Show diff only" leaves exactly the keys whose values differ: the learning rate.
        compare(page, base, experiment, [pipeline.info.run_name, child.info.run_name])
        a, b = pipeline.data.params, child.data.params
        differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        assert differ == {"optim.lr"}
        runs = {pipeline.info.run_id: a, child.info.run_id: b}
        assert params_shown_with_diff_only(page, runs) == differ
