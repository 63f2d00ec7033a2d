"""`cnnpipe review DIR`: a page on 127.0.0.1 to label the images `cnnpipe serve --capture DIR`
kept, the least confident first, each with the model's guess. A label writes the image, its EXIF
stripped, into the folder of extra training images (data.extra_train: data/labelled/<class>/),
which the next `dvc repro` trains on; "none of these" records a rejection and writes nothing;
"skip" leaves it for later. Decisions are kept in DIR/labels.jsonl.

127.0.0.1 is no boundary against a browser's other tabs, so, as Jupyter does, every request needs
the token in the URL the command prints, a Host of 127.0.0.1 or localhost on this port, and no
other Origin; the API takes JSON only, and captured bytes are served with nosniff and a CSP that
runs nothing."""

import hmac
import io
import json
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from cnnpipe import PipelineError
from cnnpipe.base.args import PORT, Parser
from cnnpipe.serving.capture import LINES
from cnnpipe.serving.http import EXCEPTION_HANDLERS, error

DECISIONS = "labels.jsonl"
DIGEST = re.compile(r"[0-9a-f]{64}")
TYPES = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp",
         "bmp": "image/bmp", "tif": "image/tiff"}  # fmt: skip
# Captured bytes are someone else's file: shown as an image, never run or sniffed as anything else.
IMAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "no-store",
}
PAGE = files("cnnpipe.serving").joinpath("review.html").read_text()


@dataclass
class Item:
    digest: str
    file: str
    reason: str
    guess: str
    confidence: float
    label: str | None = None
    rejected: bool = False

    def as_json(self) -> dict:
        decided = {"label": self.label, "rejected": self.rejected}
        return {k: getattr(self, k) for k in ("digest", "guess", "confidence", "reason")} | decided


def captured(folder: Path) -> tuple[list[str], dict[str, Item], list[str]]:
    """The class names, the captured images that can be shown, by digest, and why the others
    cannot (a line that does not parse, a file missing or unreadable, other classes)."""
    path = folder / LINES
    if not path.is_file():
        raise PipelineError(
            f"{path} does not exist; start the service with `cnnpipe serve ... --capture {folder}`"
        )
    classes: list[str] = []
    items: dict[str, Item] = {}
    skipped = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            digest, name, probs = record["digest"], record["file"], record["probabilities"]
        except (ValueError, KeyError, TypeError):
            skipped.append(f"line {number} of {LINES} (not a capture record)")
            continue
        if not DIGEST.fullmatch(str(digest)) or name.split(".")[0] != digest:
            skipped.append(f"line {number} of {LINES} (not a sha256 digest)")
            continue
        classes = classes or list(probs)
        why = unreadable(folder / name) or (list(probs) != classes and "other classes")
        if why:
            skipped.append(f"{name} ({why})")
            continue
        guess = max(probs, key=probs.get)
        items[digest] = Item(digest, name, record.get("reason", ""), guess, probs[guess])
    return classes, items, skipped


def unreadable(path: Path) -> str | None:
    """Why the captured file at `path` cannot be shown, or None."""
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError):
        return "cannot be read"
    return None


def clean_png(data: bytes) -> bytes:
    """The image as PNG, turned upright as its EXIF says and with no EXIF or other metadata."""
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    bare = Image.frombytes("RGB", upright.size, upright.tobytes())
    out = io.BytesIO()
    bare.save(out, format="PNG")
    return out.getvalue()


class Review:
    """The captured images, the decisions taken, and where labels go."""

    def __init__(self, folder: Path, into: Path) -> None:
        self.folder, self.into = folder, into
        self.classes, self.items, self.skipped = captured(folder)
        self.token = secrets.token_urlsafe(24)
        self.hosts: set[str] = set()
        for decision in self.decisions():
            if item := self.items.get(decision.get("digest", "")):
                item.label, item.rejected = decision.get("label"), decision.get("label") is None

    def decisions(self) -> list[dict]:
        path = self.folder / DECISIONS
        lines = path.read_text().splitlines() if path.is_file() else []
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash: that decision was not taken
        return found

    def serve_on(self, port: int) -> None:
        """The port the page is served on: the only Host it answers."""
        self.hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}

    def refused(self, request: Request) -> Response | None:
        """403 for a request from anywhere but this page: its Host, Origin and token."""
        if request.headers.get("host") not in self.hosts:
            return error(403, "this page answers only at 127.0.0.1 or localhost on its port")
        origin = request.headers.get("origin")
        if origin and origin.removeprefix("http://") not in self.hosts:
            return error(403, f"requests from {origin} are refused")
        token = request.headers.get("x-review-token") or request.query_params.get("token", "")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return error(403, "open the URL that `cnnpipe review` printed: it carries the token")
        return None

    def decide(self, digest: str, label: str | None) -> tuple[int, dict]:
        """Record `label` (None: none of these) for the captured image `digest`."""
        if not DIGEST.fullmatch(digest):
            return 400, {"error": f"{digest} is not a sha256 digest"}
        item = self.items.get(digest)
        if item is None:
            return 404, {"error": f"no captured image {digest} in {self.folder}"}
        if label is not None and label not in self.classes:
            return 400, {"error": f"{label!r} is not a class; the classes are: {self.classes}"}
        if item.label == label and (label is not None or item.rejected):
            return 200, item.as_json()
        if item.label is not None or item.rejected:
            taken = f"labelled {item.label}" if item.label else "rejected"
            return 409, {"error": f"{digest} is {taken} already; its decision stays"}
        if label is not None:
            self.write(item, label)
        line = {"digest": digest, "label": label, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        with open(self.folder / DECISIONS, "a") as decisions:
            decisions.write(json.dumps(line) + "\n")
        item.label, item.rejected = label, label is None
        return 200, item.as_json()

    def write(self, item: Item, label: str) -> None:
        """The image into `into`/<label>/<digest>.png, under a hidden name until it is whole."""
        folder = self.into / label
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{item.digest}.png.partial"
        partial.write_bytes(clean_png((self.folder / item.file).read_bytes()))
        os.replace(partial, folder / f"{item.digest}.png")


def review_of(request: Request) -> Review:
    return request.app.state.review


async def page(request: Request) -> Response:
    review = review_of(request)
    if refused := review.refused(request):
        return refused
    nonce = secrets.token_urlsafe(16)
    policy = (
        f"default-src 'none'; img-src 'self'; style-src 'nonce-{nonce}'; "
        f"script-src 'nonce-{nonce}'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return HTMLResponse(
        PAGE.replace("NONCE", nonce),
        headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"},
    )


async def items(request: Request) -> Response:
    review = review_of(request)
    if refused := review.refused(request):
        return refused
    shown = sorted(review.items.values(), key=lambda item: item.confidence)
    body = {"classes": review.classes, "skipped": review.skipped}
    return JSONResponse(body | {"items": [item.as_json() for item in shown]})


async def decide(request: Request) -> Response:
    review = review_of(request)
    if refused := review.refused(request):
        return refused
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return error(415, 'send JSON: {"label": "<class>"}, or {"label": null} for none of these')
    try:
        body = json.loads(await request.body())
        label = body["label"]
    except (ValueError, KeyError, TypeError):
        return error(400, 'send {"label": "<class>"}, or {"label": null} for none of these')
    if label is not None and not isinstance(label, str):
        return error(400, '"label" is a class name or null')
    status, answer = review.decide(request.path_params["digest"], label)
    return JSONResponse(answer, status_code=status)


async def image(request: Request) -> Response:
    review = review_of(request)
    if refused := review.refused(request):
        return refused
    item = review.items.get(request.path_params["digest"])
    if item is None:
        return error(404, "no such captured image")
    kind = TYPES.get(item.file.rsplit(".", 1)[-1], "application/octet-stream")
    data = (review.folder / item.file).read_bytes()
    return Response(data, media_type=kind, headers=IMAGE_HEADERS)


def create_app(review: Review) -> Starlette:
    routes = [
        Route("/", page),
        Route("/api/items", items),
        Route("/api/items/{digest}", decide, methods=["POST"]),
        Route("/images/{digest}", image),
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)
    app.state.review = review
    return app


def labelled_folder(into: str | None) -> Path:
    """--into, else params.yaml's data.extra_train here."""
    if into:
        return Path(into)
    from cnnpipe.base.config import load_params

    try:
        return Path(load_params().data.extra_train)
    except PipelineError as problem:
        raise PipelineError(f"{problem}; or say where labels go with --into") from None


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="cnnpipe review", description=__doc__)
    parser.add_argument("folder", help="the folder `cnnpipe serve --capture` wrote")
    parser.add_argument(
        "--into", help="where labelled images go (default: data.extra_train of params.yaml here)"
    )
    parser.add_argument("--port", type=PORT, default=0, help="default: any free port")
    args = parser.parse_args(argv)
    into = labelled_folder(args.into)
    try:
        sock = socket.create_server(("127.0.0.1", args.port))
    except OSError as failure:
        raise PipelineError(
            f"cannot listen on 127.0.0.1:{args.port} ({os.strerror(failure.errno or 0)}); "
            "choose another --port, or leave it out"
        ) from None
    port = sock.getsockname()[1]
    review = Review(Path(args.folder), into)
    review.serve_on(port)
    if review.skipped:
        shown = ", ".join(review.skipped[:5]) + (" ..." if len(review.skipped) > 5 else "")
        print(f"review: skipped {len(review.skipped)}: {shown}", file=sys.stderr)
    print(
        f"review: {len(review.items)} captured images, labels into {into}/<class>/\n"
        f"open http://127.0.0.1:{port}/?token={review.token}  (Ctrl+C stops)",
        file=sys.stderr,
    )
    from cnnpipe.serving.server import server

    server(create_app(review), "127.0.0.1", port, header_timeout_s=10).run(sockets=[sock])
