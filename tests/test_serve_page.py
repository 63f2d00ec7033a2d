"""The service's page in a real headless browser (Debian's chromium driven by Playwright), used as
a person uses it: choose image files, read each one's top classes."""

import re
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from cnnpipe.data.images import decode
from cnnpipe.serving.app import create_app
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.serving.server import running
from tests.helpers import CLASSES, export_random_model

CHROMIUM = "/usr/bin/chromium"


def test_a_person_chooses_images_and_reads_their_top_classes(tmp_path):
    assert Path(CHROMIUM).is_file(), "install the browser: apt-get install chromium"
    model = export_random_model(tmp_path / "model.onnx", CLASSES)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(
        photo
    )
    (tmp_path / "notes.txt").write_text("not an image")
    pixels, _ = decode(photo.read_bytes(), (32, 32))
    probs = OnnxModel.load(model).probabilities(pixels[None])[0]
    top = np.argsort(-probs)[:3]

    with running(create_app(str(model))) as url, sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = chromium.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            expect(page.locator("#model")).to_have_text(
                re.compile(r"^Model cnnpipe-test · test accuracy 50\.00% · 10 classes: airplane")
            )
            page.set_input_files("#files", [photo, tmp_path / "notes.txt"])
            cards = page.locator(".card")
            expect(cards).to_have_count(2)
            photo_card, notes_card = cards.nth(0), cards.nth(1)
            expect(photo_card.locator(".name")).to_have_text("photo.png")
            expect(photo_card.locator(".note")).to_have_text("resized from 48x64")
            bars = photo_card.locator(".bar")
            expect(bars).to_have_count(3)
            shown = [
                f"{CLASSES[i]} {100 * probs[i]:.1f}%" for i in top
            ]  # what each bar says to a screen reader, most probable first
            assert [bars.nth(k).get_attribute("aria-label") for k in range(3)] == shown
            expect(bars.nth(0).locator(".label")).to_have_text(CLASSES[top[0]])
            width = bars.nth(0).locator(".fill").evaluate("e => e.style.width")
            assert width == f"{100 * probs[top[0]]:.1f}%"
            expect(notes_card.locator(".status")).to_have_text(
                "Not classified: not a readable image: not a format an image library knows"
            )
        finally:
            chromium.close()
