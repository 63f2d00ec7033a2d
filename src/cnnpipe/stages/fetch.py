"""Stage `fetch`: download the CIFAR-10 archive, verify its md5 and extract the batch files."""

import hashlib
import http.client
import json
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from cnnpipe import PipelineError
from cnnpipe.args import Parser
from cnnpipe.cifar import (
    ARCHIVE_DIR,
    BATCH_FILES,
    SOURCE_FILE,
    TEST_BATCH,
    TRAIN_BATCHES,
    load_batch,
    read_class_names,
)
from cnnpipe.config import load_params

EXPECTED_MEMBERS = {ARCHIVE_DIR, *(f"{ARCHIVE_DIR}/{name}" for name in BATCH_FILES)}
CHUNK = 1 << 20


def as_url(source: str) -> str:
    """Plain paths become file:// URLs so one code path serves local copies and downloads."""
    if "://" in source:
        return source
    return Path(source).expanduser().resolve().as_uri()


def download(url: str, dest: Path, timeout_s: float) -> str:
    """Stream `url` to `dest` with a progress bar; return the md5 of what was written."""
    md5 = hashlib.md5()
    stopped = f"the download of {url} stopped part way ({{}} bytes); run the stage again"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc="download") as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
    except http.client.IncompleteRead as error:
        received = dest.stat().st_size + len(error.partial)
        raise PipelineError(stopped.format(f"{received} of {size}")) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            raise PipelineError(
                f"{url} sent nothing for {timeout_s:g} s; try again later or raise fetch.timeout_s"
            ) from None
        raise PipelineError(
            f"cannot read {url} ({reason}). Offline? Point fetch.url and fetch.md5 at an archive "
            "on disk in conf/local/default.yaml, then run `cnnpipe params` "
            "(docs/pipeline.md, Offline)"
        ) from None
    if size is not None and dest.stat().st_size != size:
        raise PipelineError(stopped.format(f"{dest.stat().st_size} of {size}"))
    return md5.hexdigest()


def _regular_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """Extraction filter: refuse members that escape `dest` or are not plain files or folders;
    skip any but the batch files (the official archive also holds a readme.html)."""
    parts = PurePosixPath(member.name).parts
    if member.name.startswith("/") or ".." in parts:
        raise PipelineError(f"archive member {member.name!r} points outside the target folder")
    if not (member.isfile() or member.isdir()):
        raise PipelineError(f"archive member {member.name!r} is a link or device, refused")
    if member.name not in EXPECTED_MEMBERS:
        return None
    return tarfile.data_filter(member, dest)


def extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter=_regular_member)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise PipelineError(f"{archive} is not a readable tar.gz archive ({error})") from None


def fetch(url: str, md5: str, dest: Path, timeout_s: float = 60) -> None:
    """Put the verified batch files in `dest`; `dest` appears only when everything succeeded."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        url = as_url(url)
        got = download(url, archive, timeout_s)
        if got != md5:
            raise PipelineError(
                f"md5 of {url} is {got}, expected {md5}: the file is corrupt or another version; "
                "download it again or set fetch.md5 if you trust it"
            )
        extract(archive, Path(tmp) / "extracted")
        batches = Path(tmp) / "extracted" / ARCHIVE_DIR
        missing = [name for name in BATCH_FILES if not (batches / name).is_file()]
        if missing:
            raise PipelineError(f"{url} has no {ARCHIVE_DIR}/{', '.join(missing)}")
        # Read as train will read them, before they replace anything: a batch that is not data
        # (a pickle that would run code, wrong shapes or labels) must not cost the good data.
        try:
            read_class_names(batches)
            for name in [*TRAIN_BATCHES, TEST_BATCH]:
                load_batch(batches / name)
        except PipelineError as error:
            reason = str(error).replace(f"{batches}/", f"{ARCHIVE_DIR}/")
            raise PipelineError(f"{url}: {reason}; {dest} was left as it was") from None
        (batches / SOURCE_FILE).write_text(json.dumps({"url": url, "md5": md5}) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        batches.rename(dest)


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe fetch", description=__doc__).parse_args(argv)
    cfg = load_params()
    fetch(cfg.fetch.url, cfg.fetch.md5, Path(cfg.paths.data), cfg.fetch.timeout_s)
    print(f"fetched {cfg.paths.data}")
