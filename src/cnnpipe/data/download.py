"""Archives by URL or path: downloaded with a progress bar, checked by md5, and extracted safely
(.tar.gz or .zip): no member may point outside the target folder or be a link or a device."""

import hashlib
import http.client
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from cnnpipe import PipelineError

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
                f"{url} sent nothing for {timeout_s:g} s; try again later or raise data.timeout_s"
            ) from None
        raise PipelineError(
            f"cannot read {url} ({reason}). Offline? Point source and md5 at an archive on "
            "disk in conf/local/data/cifar10.yaml, then run `cnnpipe params` "
            "(docs/pipeline.md, Offline)"
        ) from None
    if size is not None and dest.stat().st_size != size:
        raise PipelineError(stopped.format(f"{dest.stat().st_size} of {size}"))
    return md5.hexdigest()


def fetch_archive(url: str, md5: str | None, dest: Path, timeout_s: float) -> Path:
    """`url` downloaded to `dest`, its md5 checked when one is given."""
    got = download(url, dest, timeout_s)
    if md5 and got != md5:
        raise PipelineError(
            f"md5 of {url} is {got}, expected {md5}: the file is corrupt or another version; "
            "download it again or set data.md5 if you trust it"
        )
    return dest


def check_member(name: str, is_plain: bool) -> None:
    """Refuse a member that escapes the target folder or is not a plain file or folder."""
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts:
        raise PipelineError(f"archive member {name!r} points outside the target folder")
    if not is_plain:
        raise PipelineError(f"archive member {name!r} is a link or device, refused")


def extract(archive: Path, dest: Path, wanted: Callable[[str], bool] = lambda name: True) -> None:
    """Extract the members of a .tar.gz or .zip `archive` that `wanted` accepts into `dest`."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    kind = stat.S_IFMT(info.external_attr >> 16)
                    check_member(info.filename, kind in (0, stat.S_IFREG, stat.S_IFDIR))
                zf.extractall(dest, [i for i in zf.infolist() if wanted(i.filename)])
            return
        with tarfile.open(archive, "r:*") as tar:

            def member_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
                check_member(member.name, member.isfile() or member.isdir())
                return tarfile.data_filter(member, path) if wanted(member.name) else None

            tar.extractall(dest, filter=member_filter)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise PipelineError(
            f"{archive} is not a readable .tar.gz or .zip archive ({error})"
        ) from None
