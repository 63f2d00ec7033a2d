"""`cnnpipe review`: the captured images labelled through a JSON API that only its own page can
call, and through that page in a real browser (Debian's chromium driven by Playwright)."""

import contextlib
import hashlib
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from prometheus_client import CollectorRegistry

from cnnpipe import PipelineError
from cnnpipe.serving.capture import Capture, Settings
from cnnpipe.serving.review import DECISIONS, Review, create_app
from cnnpipe.serving.server import running
from tests.helpers import CLASSES

CHROMIUM = "/usr/bin/chromium"
# The top probability of each captured image, in the order captured.
CONFIDENCES = [0.45, 0.12, 0.3]


def photo(seed: int, gps: bool = False) -> bytes:
    """A JPEG, taken on its side (EXIF orientation 6), with a GPS position when `gps`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    if gps:
        exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", exif=exif, quality=95)
    return out.getvalue()


@pytest.fixture
def captured(tmp_path) -> tuple[Path, list[bytes]]:
    """What `cnnpipe serve --capture` kept of three answers."""
    folder = tmp_path / "captured"
    images = [photo(i, gps=i == 0) for i in range(len(CONFIDENCES))]
    capture = Capture(Settings(str(folder), unsure_below=1.0, sample_share=0.0), {"name": "m"},
                      CLASSES,
                      CollectorRegistry())  # fmt: skip
    for data, top in zip(images, CONFIDENCES, strict=True):
        probs = np.full(10, (1 - top) / 9, np.float32)
        probs[3] = top  # the model's guess: cat
        capture.offer([data], probs[None], "/predict")
    capture.close()
    return folder, images


@contextlib.contextmanager
def reviewing(folder: Path, into: Path) -> Iterator[tuple[str, Review]]:
    review = Review(folder, into)
    with running(create_app(review)) as url:
        review.serve_on(int(url.rsplit(":", 1)[1]))
        yield url, review


def ask(url: str, review: Review | None, body=None, content_type="application/json", **headers):
    """(status, JSON) of a request with the review's token, unless a header says otherwise."""
    headers = {"X-Review-Token": review.token if review else "", **headers}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if body is not None:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as failure:
        return failure.code, json.loads(failure.read())


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_items_come_least_confident_first_with_the_models_guess(captured, tmp_path):
    folder, images = captured
    with reviewing(folder, tmp_path / "labelled") as (url, review):
        status, body = ask(f"{url}/api/items", review)
    assert status == 200 and body["classes"] == CLASSES and body["skipped"] == []
    order = np.argsort(CONFIDENCES)
    assert [item["digest"] for item in body["items"]] == [digest(images[i]) for i in order]
    first = body["items"][0]
    assert (first["guess"], first["reason"], first["label"], first["rejected"]) == (
        "cat", "unsure", None, False
    )  # fmt: skip
    assert first["confidence"] == pytest.approx(min(CONFIDENCES))


def test_a_label_writes_the_image_upright_without_its_exif(captured, tmp_path):
    folder, images = captured
    labelled = tmp_path / "labelled"
    with reviewing(folder, labelled) as (url, review):
        status, item = ask(f"{url}/api/items/{digest(images[0])}", review, {"label": "dog"})
    assert status == 200 and item["label"] == "dog"
    (written,) = (labelled / "dog").iterdir()
    assert written.name == f"{digest(images[0])}.png"
    with Image.open(io.BytesIO(images[0])) as original:
        assert original.getexif()[0x8825], "the capture kept its GPS position"
        upright = np.asarray(original.transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    with Image.open(written) as saved:
        assert not saved.getexif() and not saved.info.get("exif")
        assert np.array_equal(np.asarray(saved), upright)
    (line,) = (folder / DECISIONS).read_text().splitlines()
    assert json.loads(line)["label"] == "dog"


def test_the_api_answers_only_its_page_and_only_json(captured, tmp_path):
    folder, images = captured
    one, two = digest(images[0]), digest(images[1])
    labelled = tmp_path / "labelled"
    with reviewing(folder, labelled) as (url, review):
        port = url.rsplit(":", 1)[1]
        item = f"{url}/api/items/{one}"
        assert ask(f"{url}/api/items", None)[0] == 403, "no token"
        assert ask(f"{url}/api/items", review, Host=f"evil.example:{port}")[0] == 403
        assert ask(item, review, {"label": "cat"}, Origin="http://evil.example")[0] == 403
        status, body = ask(item, review, b"label=cat", content_type="text/plain")
        assert status == 415 and body["error"].startswith("send JSON")
        status, body = ask(item, review, {"label": "unicorn"})
        classes = f"the classes are: {CLASSES}"
        assert (status, body["error"]) == (400, f"'unicorn' is not a class; {classes}")
        assert ask(f"{url}/api/items/{'0' * 64}", review, {"label": "cat"})[0] == 404
        status, body = ask(f"{url}/api/items/..%2F..%2Fetc", review, {"label": "cat"})
        assert status in (400, 404) and not (labelled / "cat").exists()
        first = ask(item, review, {"label": "cat"})
        assert first[0] == 200 and ask(item, review, {"label": "cat"}) == first, "the same again"
        status, body = ask(item, review, {"label": "dog"})
        assert (status, body["error"]) == (
            409,
            f"{one} is labelled cat already; its decision stays",
        )
        assert ask(f"{url}/api/items/{two}", review, {"label": None})[0] == 200
        assert ask(f"{url}/api/items/{two}", review, {"label": "cat"})[0] == 409
        request = urllib.request.Request(f"{url}/images/{one}?token={review.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.read() == images[0] and response.headers["Content-Type"] == "image/jpeg"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert [p.name for p in labelled.rglob("*")] == ["cat", f"{one}.png"], (
        "the rejection wrote nothing"
    )
    decisions = [json.loads(x) for x in (folder / DECISIONS).read_text().splitlines()]
    assert [(d["digest"], d["label"]) for d in decisions] == [(one, "cat"), (two, None)]


def test_a_missing_or_corrupt_capture_is_skipped_and_named(captured, tmp_path):
    folder, images = captured
    (folder / f"{digest(images[0])}.jpg").unlink()
    (folder / f"{digest(images[1])}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    review = Review(folder, tmp_path / "labelled")
    assert list(review.items) == [digest(images[2])]
    assert review.skipped == [
        f"{digest(images[0])}.jpg (missing)", f"{digest(images[1])}.jpg (cannot be read)"
    ]  # fmt: skip
    with pytest.raises(PipelineError, match=r"nowhere/captured.jsonl does not exist; start the"):
        Review(tmp_path / "nowhere", tmp_path / "labelled")


def test_a_person_labels_with_keys_and_buttons(captured, tmp_path):
    assert Path(CHROMIUM).is_file(), "install the browser: apt-get install chromium"
    folder, images = captured
    labelled = tmp_path / "labelled"
    order = [digest(images[i]) for i in np.argsort(CONFIDENCES)]
    with reviewing(folder, labelled) as (url, review), sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = chromium.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{url}/?token={review.token}")
            expect(page.locator("#progress")).to_have_text(
                "3 to review · 0 labelled · 0 none of these · 3 captured"
            )
            expect(page.locator("#guess")).to_have_text("The model's guess: cat, 12.0%")
            page.screenshot(path=str(tmp_path / "review.png"))
            page.keyboard.press("2")  # the second class
            expect(page.locator("#status")).to_have_text(f"Labelled {CLASSES[1]}.")
            expect(page.locator("#guess")).to_have_text("The model's guess: cat, 30.0%")
            page.get_by_role("button", name="skip").click()
            expect(page.locator("#guess")).to_have_text("The model's guess: cat, 45.0%")
            page.get_by_role("button", name="none of these").click()
            expect(page.locator("#progress")).to_have_text(
                "1 to review · 1 labelled · 1 none of these · 3 captured"
            )
            expect(page.locator("#guess")).to_have_text("The model's guess: cat, 30.0%")
            chips = page.locator("#all .chip")
            expect(chips).to_have_text([CLASSES[1], "to review", "none of these"])
        finally:
            chromium.close()
    assert sorted(str(p.relative_to(labelled)) for p in labelled.rglob("*.png")) == [
        f"{CLASSES[1]}/{order[0]}.png"
    ]
    decisions = [json.loads(x) for x in (folder / DECISIONS).read_text().splitlines()]
    assert [(d["digest"], d["label"]) for d in decisions] == [
        (order[0], CLASSES[1]), (order[2], None)
    ]  # fmt: skip
