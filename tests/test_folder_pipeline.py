"""Your own images end to end: `dvc repro` on a folder of three classes at 48x48, every stage,
then the registered champion served and its page read in a real browser."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from cnnpipe.base.localhost import free_port, wait_for_http
from tests.helpers import (
    copy_repo,
    defaults,
    keras_chapter_params,
    make_image_folder,
    repo_env,
)

CHROMIUM = "/usr/bin/chromium"
CLASSES = ["bolt", "nut", "washer"]


@pytest.mark.slow
def test_a_folder_of_images_goes_through_every_stage_and_is_served(tmp_path):
    folder = tmp_path / "parts"
    make_image_folder(folder, CLASSES, per_class=30, size=(60, 60))
    make_image_folder(folder, CLASSES, per_class=10, size=(40, 50), fmt="JPEG", seed=1)
    # 30 PNG and 10 JPEG images of other sizes per class: 0.png..29.png, 0.jpg..9.jpg.
    repo = tmp_path / "repo"
    copy_repo(repo)
    env = repo_env(repo)

    def run(*cmd: str) -> str:
        result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (
            f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        return result.stdout + result.stderr

    run(
        "cnnpipe", "params", "data=folder", f"data.source={folder}", "data.image_size=48",
        "trainer.max_epochs=2", "loader.batch_size=32", "evaluate.batch_size=16",
        "quantize.max_accuracy_drop=1.0", "quantize.min_speedup=0",
    )  # fmt: skip
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pipeline"]):
        run("git", *command)
    shown = run("dvc", "repro")
    assert "prepared parts: 120 images of 48x48, 3 classes (40 to 40 images each)" in shown
    assert "Traceback" not in shown

    params = json.loads((repo / "metrics/params.json").read_text())
    assert params["model.params"] == keras_chapter_params(48, 3)
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert set(evaluation) >= {f"test.acc.{name}" for name in CLASSES}
    parity = json.loads((repo / "metrics/parity.json").read_text())
    assert parity["parity.top1_agreement"] == 1.0
    assert parity["parity.max_abs_diff"] <= defaults().parity.atol
    for name in ("metrics/quantize.json", "metrics/baseline.json", "reports/chapter.md"):
        assert (repo / name).is_file(), name
    model = onnx.load(repo / "models/model.onnx")
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [48, 48, 3]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES and props["dataset"] == "parts"

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("cnnpipe-parts", "champion")
    assert "uint8 RGB images as decoded, shape (N, 48, 48, 3)" in champion.description
    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    inputs = client.get_run(run_id).inputs.dataset_inputs
    (dataset,) = [d for d in inputs if d.dataset.name == "parts"]
    assert {t.key: t.value for t in dataset.tags}["image_size"] == "48x48"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "Data and pipelines are up to date." in run("dvc", "repro")
    # The folder is the prepare stage's dependency: a new image is a change DVC sees.
    Image.new("RGB", (48, 48), (1, 2, 3)).save(folder / "nut" / "new.png")
    assert "prepare" in json.loads(run("dvc", "status", "--json"))
    (folder / "nut" / "new.png").unlink()

    port = free_port()
    serve_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    server = subprocess.Popen(
        ["cnnpipe", "serve", "models:/cnnpipe-parts@champion", "--port", str(port)],
        cwd=repo, env=serve_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((90, 70, 3), 120, np.uint8)).save(photo)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url, server, "cnnpipe serve", deadline_s=90)
        with sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=CHROMIUM)
            try:
                page = chromium.new_page()
                page.set_default_timeout(30_000)
                page.goto(url)
                expect(page.locator("h1")).to_have_text("parts image classifier")
                expect(page.locator("#model")).to_have_text(
                    re.compile(r"^Model cnnpipe-parts version 1 \(@champion\) · test accuracy "
                               r"\d+\.\d\d% · 3 classes: bolt, nut, washer$")
                )  # fmt: skip
                expect(page.locator("#hint")).to_have_text(
                    "Any size; each is converted to RGB and scaled to 48×48 pixels."
                )
                page.set_input_files("#files", [photo])
                expect(page.locator(".card .note")).to_have_text("resized from 70x90")
                labels = page.locator(".card .bar .label")
                expect(labels).to_have_count(3)
                assert sorted(labels.all_inner_texts()) == CLASSES
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            finally:
                chromium.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert Path(tmp_path / "page.png").stat().st_size > 0
