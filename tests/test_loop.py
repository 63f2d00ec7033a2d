"""The loop on tiny data, as docs/loop.md runs it on CIFAR-10's JPEGs: `dvc repro`, the champion
served with capture, what it met labelled through the review API, `dvc repro` again, and the
service on whatever version the gate left as champion."""

import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from cnnpipe.base.localhost import free_port, wait_for_http, wait_until
from cnnpipe.serving.review import Review, create_app
from cnnpipe.serving.server import running
from tests.helpers import call, copy_repo, make_image_folder, repo_env, samples

CLASSES = ["bolt", "nut", "washer"]


@pytest.mark.slow
def test_what_the_service_met_comes_back_as_training_data_and_a_gated_model(tmp_path):
    make_image_folder(tmp_path / "parts", CLASSES, per_class=30, size=(32, 32))
    met = make_image_folder(tmp_path / "new", CLASSES, per_class=4, size=(32, 32), seed=7)
    repo = tmp_path / "repo"
    copy_repo(repo)
    env = repo_env(repo)

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    run("cnnpipe", "params", "data=folder", f"data.source={tmp_path / 'parts'}",
        "trainer.max_epochs=4", "loader.batch_size=32", "evaluate.batch_size=16")  # fmt: skip
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pipeline"]):
        run("git", *command)
    assert "champion is version 1, the first version of cnnpipe-parts" in run(
        "dvc", "repro", "promote"
    )
    before = json.loads((repo / "metrics/promotion.json").read_text())

    port, log = free_port(), tmp_path / "serve.log"
    command = ["cnnpipe", "serve", "models:/cnnpipe-parts@champion", "--port", str(port)]
    options = ["--workers", "1", "--alias-check-s", "0.5", "--capture", "captured"]
    with open(log, "w") as stderr:
        service = subprocess.Popen(
            [*command, *options, "--capture-share", "1"], cwd=repo, env=env,
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health/ready", service, "cnnpipe serve", deadline_s=60)
        for path in sorted(met):
            status, _ = call(f"{url}/predict", (tmp_path / "new" / path).read_bytes(), "image/png")
            assert status == 200
        lines = repo / "captured" / "captured.jsonl"
        captured = lambda: lines.exists() and len(lines.read_text().splitlines()) == 12  # noqa: E731
        wait_until("12 captures", captured, 30)
        # The file the pipeline made carries its test split's reference: the service and the
        # monitor compare what it met with it.
        drift = {k[0]: v for k, v in samples(url).items() if k[0].startswith("cnnpipe_drift_")}
        assert drift["cnnpipe_drift_window_images"] == 12 and len(drift) == 6
        tested = json.loads((repo / "models/drift_reference.json").read_text())["images"]
        report = run("cnnpipe", "monitor", "captured").splitlines()
        assert (
            report[0]
            == f"cnnpipe-parts version 1: 12 sampled captures against {tested} test images"
        )
        assert all(line.endswith("too few images to tell (under 500)") for line in report[1:6])

        # A person labels each captured image with its class, through the review page's API.
        review = Review(repo / "captured", repo / "data" / "labelled")
        truth = {
            hashlib.sha256((tmp_path / "new" / path).read_bytes()).hexdigest(): path for path in met
        }
        with running(create_app(review)) as page:
            review.serve_on(int(page.rsplit(":", 1)[1]))
            for digest, path in truth.items():
                body = json.dumps({"label": path.split("/")[0]}).encode()
                token = {"X-Review-Token": review.token}
                assert post(f"{page}/api/items/{digest}", body, token)[0] == 200
        assert len(list((repo / "data" / "labelled").rglob("*.png"))) == 12

        start = time.monotonic()
        said = run("dvc", "repro", "promote")
        assert "added 12 labelled training images from data/labelled" in said
        after = json.loads((repo / "metrics/promotion.json").read_text())
        # Scored on the same test images as before the labels.
        assert after["promotion.images"] == before["promotion.images"]
        assert after["promotion.version"] == "2" and after["promotion.decision"] in said
        want = "2" if after["promotion.promoted"] else "1"
        wait_until(
            f"the service on version {want}",
            lambda: call(f"{url}/health")[1]["version"] == want,
            30,
        )
        print(f"from dvc repro to version {want} served: {time.monotonic() - start:.1f} s")
    finally:
        service.kill()
        service.wait(timeout=30)
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    extra = [f for f in manifest["files"] if f["split"] == "extra"]
    assert len(extra) == 12 and all(f["path"].startswith("data/labelled/") for f in extra)


def post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, headers={**headers, "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as failure:
        return failure.code, json.loads(failure.read())
