"""`dvc repro` of the whole pipeline in a temporary git repository, downloading over real HTTP,
then each journey on its results. The tests run in this order on one repository: the later ones
change its workspace."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from omegaconf import OmegaConf

from cnnpipe.base.localhost import free_port, wait_for_http
from tests.helpers import copy_repo, defaults, folder_over_http, make_archive, repo_env

# Keep the INT8 model whatever it loses or gains on the tiny data, to see it registered.
OVERRIDES = [
    "data.val_size=40",
    "trainer.max_epochs=1",
    "loader.batch_size=64",
    "evaluate.batch_size=16",
    "quantize.max_accuracy_drop=1.0",
    "quantize.min_speedup=0",
]


@dataclass
class Pipeline:
    repo: Path
    env: dict
    commit: str
    shown: str  # what `dvc repro` printed
    tmp: Path

    def run(self, *cmd: str, cwd: Path | None = None) -> str:
        result = subprocess.run(
            cmd, cwd=cwd or self.repo, env=self.env, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def outputs(self) -> list[str]:
        """Every file under the configured paths (conf/config.yaml), the resume state aside."""
        paths = OmegaConf.load(self.repo / "params.yaml").paths
        found = []
        for key, path in paths.items():
            if key == "resume":
                continue
            where = self.repo / path
            assert where.exists(), f"paths.{key}: {path} missing"
            files = (
                [where] if where.is_file() else sorted(f for f in where.rglob("*") if f.is_file())
            )
            found += [str(f.relative_to(self.repo)) for f in files]
        return found

    def mlflow_run(self):
        run_id = json.loads((self.repo / "models/mlflow_run.json").read_text())["run_id"]
        return self.client().get_run(run_id)

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(f"sqlite:///{self.repo / 'mlflow.db'}")

    def metrics(self, name: str) -> dict:
        return json.loads((self.repo / "metrics" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "www").mkdir()
    md5 = make_archive(tmp / "www" / "cifar-10-python.tar.gz")
    with folder_over_http(tmp / "www") as base:
        repo = tmp / "repo"
        copy_repo(repo)
        pipeline = Pipeline(repo, repo_env(repo), "", "", tmp)
        # The archive's place as an offline user gives it, once: `cnnpipe params`, `dvc exp
        # run -S` and queued experiments must all keep it.
        local = f"source: {base}/cifar-10-python.tar.gz\nmd5: {md5}\n"
        (repo / "conf/local/data").mkdir(parents=True)
        (repo / "conf/local/data/cifar10.yaml").write_text(local)
        pipeline.run("cnnpipe", "params", *OVERRIDES)
        pipeline.run("git", "init", "-q")
        pipeline.run("git", "add", "-A")
        pipeline.run("git", "commit", "-qm", "pipeline")
        pipeline.commit = pipeline.run("git", "rev-parse", "HEAD").strip()
        repro = subprocess.run(
            ["dvc", "repro"], cwd=repo, env=pipeline.env, capture_output=True, text=True
        )
        assert repro.returncode == 0, f"dvc repro failed:\n{repro.stdout}\n{repro.stderr}"
        pipeline.shown = repro.stdout + repro.stderr
        (tmp / "repro.log").write_text(pipeline.shown)
        yield pipeline


@pytest.mark.slow
def test_repro_writes_every_output_and_prints_only_what_a_person_needs(pipeline):
    pipeline.outputs()
    # Progress and results, not Lightning's advertisements for other services nor a library's
    # deprecation notice.
    shown = pipeline.shown
    assert "Epoch 0: 100%" in shown and "test.acc" in shown
    assert "💡" not in shown and "LeafSpec" not in shown and "Traceback" not in shown
    assert pipeline.metrics("params")["model.params"] == 122_570
    parity = pipeline.metrics("parity")
    assert parity["parity.top1_agreement"] == 1.0
    assert parity["parity.max_abs_diff"] <= defaults().parity.atol
    assert parity["parity.images"] == 50


@pytest.mark.slow
def test_one_mlflow_run_records_every_stage_and_its_lineage(pipeline):
    repo, client = pipeline.repo, pipeline.client()
    mlflow_run = pipeline.mlflow_run()
    metrics, run_id = mlflow_run.data.metrics, mlflow_run.info.run_id
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["cnnpipe.stage"] == "chapter", "the last stage in dvc.yaml"
    # Every stage records its metrics file and the run under the same names: numbers as
    # metrics, words (a version, a decision) as tags.
    for path in sorted((repo / "metrics").glob("*.json")):
        recorded = json.loads(path.read_text())
        words = {k: v for k, v in recorded.items() if isinstance(v, str)}
        numbers = {k: float(v) for k, v in recorded.items() if k not in words}
        assert {k: metrics[k] for k in numbers} == numbers, path
        assert {k: mlflow_run.data.tags[k] for k in words} == words, path
    assert mlflow_run.data.tags["mlflow.source.git.commit"] == pipeline.commit
    artifacts = {a.path for a in client.list_artifacts(run_id, "lineage")}
    assert artifacts == {"lineage/params.yaml", "lineage/dvc.lock"}
    html = {a.path for a in client.list_artifacts(run_id, "reports")}
    assert "reports/chapter.html" in html and "reports/chapter.md" not in html
    props = {p.key: p.value for p in onnx.load(repo / "models/model.onnx").metadata_props}
    assert props["mlflow_run_id"] == run_id and props["git_commit"] == pipeline.commit
    assert not (repo / "mlruns").exists(), "nothing in the deprecated file store"


@pytest.mark.slow
def test_the_registry_holds_both_models_with_their_own_results(pipeline):
    client, mlflow_run = pipeline.client(), pipeline.mlflow_run()
    run_id, experiment_id = mlflow_run.info.run_id, mlflow_run.info.experiment_id
    parity, quantized = pipeline.metrics("parity"), pipeline.metrics("quantize")
    (version,) = client.search_model_versions("name='cnnpipe-cifar10'")
    assert version.run_id == run_id
    assert f"**{parity['parity.onnx_test_acc']:.2%}** on 50 test images" in version.description
    link = f"(#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning)"
    assert link in version.description
    assert "122,570 parameters" in version.description
    assert (
        client.get_model_version_by_alias("cnnpipe-cifar10", "champion").version == version.version
    )
    # The INT8 model, kept, is registered and served from the registry like the FP32 one.
    (int8,) = client.search_model_versions("name='cnnpipe-cifar10-int8'")
    assert f"**{quantized['int8.test_acc']:.2%}**" in int8.description
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{pipeline.repo / 'mlflow.db'}")
    try:
        served = mlflow.pyfunc.load_model("models:/cnnpipe-cifar10-int8/1").predict(images)
    finally:
        mlflow.set_tracking_uri(previous)
    session = ort.InferenceSession(pipeline.repo / "models/int8/model.onnx")
    (want,) = session.run(None, {"images": images})
    np.testing.assert_allclose(np.asarray(list(served.values())[0]), want, atol=1e-6)
    # Each logged model carries its own results on the test set, and nothing else of the run.
    logged = client.search_logged_models([experiment_id])
    own = {
        m.name: {(x.key, x.value, x.dataset_name) for x in m.metrics or []} for m in logged
    }  # fmt: skip
    assert own == {
        "ChapterCNN-onnx": {
            ("test.acc", parity["parity.onnx_test_acc"], "cifar10-test"),
            ("parity.max_abs_diff", parity["parity.max_abs_diff"], "cifar10-test"),
            ("parity.top1_agreement", parity["parity.top1_agreement"], "cifar10-test"),
        },
        "ChapterCNN-onnx-int8": {
            (key, quantized[key], "cifar10-test")
            for key in ("int8.test_acc", "int8.accuracy_drop", "int8.speedup")
        },
    }
    # ... while the run keeps the pipeline's own values under the same names.
    assert mlflow_run.data.metrics["test.acc"] == parity["parity.onnx_test_acc"]


@pytest.mark.slow
def test_mlflow_serves_the_champion(pipeline):
    """`mlflow models serve -m models:/<name>@champion` answers as the ONNX file does."""
    repo, env = pipeline.repo, pipeline.env
    port = free_port()
    serve_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    cmd = ["mlflow", "models", "serve", "-m", "models:/cnnpipe-cifar10@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        cmd,
        cwd=repo,
        env=serve_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/ping", server, "mlflow models serve", deadline_s=90)
        images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        request = urllib.request.Request(
            f"{base}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        probs = np.array(answer["predictions"]["probabilities"])
        (want,) = ort.InferenceSession(repo / "models/model.onnx").run(None, {"images": images})
        np.testing.assert_allclose(probs, want, atol=1e-6)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_second_repro_does_nothing_and_a_teammate_pulls_every_output(pipeline):
    run, tmp = pipeline.run, pipeline.tmp
    assert "Data and pipelines are up to date." in run("dvc", "repro")
    # docs/scale-out.md: the outputs through a DVC remote into a teammate's fresh clone.
    run("dvc", "remote", "add", "-d", "storage", str(tmp / "dvc-remote"))
    run("dvc", "push")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "Results")
    teammate = tmp / "teammate"
    run("git", "clone", "-q", str(pipeline.repo), str(teammate))
    run("dvc", "pull", cwd=teammate)
    for name in pipeline.outputs():
        assert (teammate / name).read_bytes() == (pipeline.repo / name).read_bytes(), name


# Python runs sitecustomize.py at start-up from PYTHONPATH: the stage that DVC starts then
# SIGKILLs itself as it puts its first output in place.
DIE_AT_FIRST_OUTPUT = """
import os, signal
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if ".partial-" in os.fspath(src):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
"""


@pytest.mark.slow
def test_a_stage_killed_under_dvc_leaves_no_run_running(pipeline):
    hook = pipeline.tmp / "die"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_AT_FIRST_OUTPUT)
    env = {**pipeline.env, "PYTHONPATH": f"{hook}{os.pathsep}{pipeline.env['PYTHONPATH']}"}
    killed = subprocess.run(
        ["dvc", "repro", "-f", "-s", "evaluate"], cwd=pipeline.repo, env=env, capture_output=True
    )
    assert killed.returncode != 0
    # Nothing for DVC to redo: the outputs are the ones dvc.lock records. The run is as true.
    assert "Data and pipelines are up to date." in pipeline.run("dvc", "repro")
    mlflow_run = pipeline.mlflow_run()
    assert mlflow_run.info.status == "FINISHED"
    client = pipeline.client()
    statuses = [r.info.status for r in client.search_runs([mlflow_run.info.experiment_id])]
    assert "RUNNING" not in statuses
    # The next cnnpipe command puts the killed attempt on record under the finished run.
    pipeline.run("cnnpipe", "runs")
    attempts = client.search_runs(
        [mlflow_run.info.experiment_id], f"tags.mlflow.parentRunId = '{mlflow_run.info.run_id}'"
    )
    assert [(r.info.run_name, r.info.status) for r in attempts] == [("evaluate killed", "KILLED")]


@pytest.mark.slow
def test_dvc_plots_show_only_meaningful_plots(pipeline):
    # Curves on epochs and seconds with named axes, one confusion matrix with true classes on
    # the rows, the chapter's pictures; nothing twice.
    plots = json.loads(pipeline.run("dvc", "plots", "show", "--json"))["data"]
    assert set(plots) == {
        "Accuracy per epoch",
        "Validation accuracy per second of training",
        "Loss per epoch",
        "Confusion matrix (test set)",
        "plots/confusion.png",
        *(
            f"plots/chapter/{name}.png"
            for name in ("params", "curves", "filters", "feature_maps", "mistakes")
        ),
    }
    for name in ("Accuracy per epoch", "Loss per epoch"):
        encoding = plots[name][0]["content"]["encoding"]
        assert encoding["x"] == {"field": "epoch", "type": "quantitative", "title": "epoch"}
    confusion = plots["Confusion matrix (test set)"][0]["content"]
    assert confusion["spec"]["encoding"]["y"]["field"] == "true class"
    assert confusion["params"][0] == {
        "name": "showValues",
        "value": True,
        "bind": {"input": "checkbox"},
    }


@pytest.mark.slow
def test_a_bad_value_costs_no_output(pipeline):
    # DVC would delete the outputs before the stage fails, were they not persistent.
    repo = pipeline.repo
    kept = {name: (repo / name).read_bytes() for name in pipeline.outputs()}
    models = ", ".join(sorted(p.stem for p in (repo / "conf/model").glob("*.yaml")))
    why = {
        "data.md5=00000000000000000000000000000000": "expected 00000000000000000000000000000000",
        "trainer.max_epochs=abc": "config key trainer.max_epochs: 'abc' is not an integer",
        # DVC composes conf/ itself: an unknown choice still ends in the stage's one line.
        "model=does_not_exist": f"conf/model has no does_not_exist; choose one of: {models}",
    }
    for bad, reason in why.items():
        tried = [*(o for o in OVERRIDES if not o.startswith(bad.split("=")[0])), bad]
        failed = subprocess.run(
            ["dvc", "exp", "run", *(arg for o in tried for arg in ("-S", o))],
            cwd=repo, env=pipeline.env, capture_output=True, text=True,
        )  # fmt: skip
        assert failed.returncode != 0, failed.stdout
        assert {name: (repo / name).read_bytes() for name in kept} == kept, bad
        # One line from the stage, which says how to get params.yaml back.
        (said,) = [line for line in failed.stderr.splitlines() if line.startswith("cnnpipe ")]
        assert said.endswith("`git checkout params.yaml` restores the committed ones)"), said
        assert reason in said, said
        assert "Traceback" not in failed.stderr, failed.stderr
    pipeline.run("git", "checkout", "params.yaml")


SET_ARGS = [arg for o in [*OVERRIDES, "evaluate.batch_size=25"] for arg in ("-S", o)]


@pytest.mark.slow
def test_an_experiment_reruns_only_the_stages_its_change_reaches(pipeline):
    # DVC composes conf/ with the overrides through Hydra; only evaluate depends on the change.
    output = pipeline.run("dvc", "exp", "run", *SET_ARGS)
    stages_run = [line for line in output.splitlines() if line.startswith("Running stage")]
    assert stages_run == ["Running stage 'evaluate':"]
    assert OmegaConf.load(pipeline.repo / "params.yaml").evaluate.batch_size == 25
    exp_name = pipeline.mlflow_run().data.tags.get("dvc.exp_name")
    assert exp_name and exp_name in pipeline.run("dvc", "exp", "list", "--name-only")


@pytest.mark.slow
def test_a_queued_experiment_logs_to_this_repositorys_store(pipeline):
    # It runs in a copy under .dvc/tmp/exps.
    run = pipeline.run
    run(
        "dvc",
        "exp",
        "run",
        "--queue",
        "--name",
        "two-epochs",
        *SET_ARGS,
        "-S",
        "trainer.max_epochs=2",
    )
    run("dvc", "queue", "start")
    deadline = time.monotonic() + 600
    while "two-epochs" not in (done := run("dvc", "queue", "status")) or re.search(
        r"two-epochs\s.*(Queued|Running)", done
    ):
        assert time.monotonic() < deadline, done
        time.sleep(3)
    assert re.search(r"two-epochs\s.*Success", done), run("dvc", "queue", "logs", "two-epochs")
    header, *rows = list(csv.reader(io.StringIO(run("dvc", "exp", "show", "--csv"))))
    (row,) = [dict(zip(header, r, strict=True)) for r in rows if r[0] == "two-epochs"]
    assert row["trainer.max_epochs"] == "2"
    (queued_run,) = pipeline.client().search_runs(
        [pipeline.mlflow_run().info.experiment_id], "tags.`dvc.exp_name` = 'two-epochs'"
    )
    assert queued_run.data.params["trainer.max_epochs"] == "2"
    assert queued_run.info.run_name == "two-epochs", "named as DVC names the experiment"
    # The experiment's own result, as DVC shows it, is the one its run recorded.
    assert queued_run.data.metrics["test.acc"] == pytest.approx(float(row["test.acc"]))
    assert not list((pipeline.repo / ".dvc" / "tmp" / "exps").glob("*/mlflow.db")), (
        "no copy's store"
    )
