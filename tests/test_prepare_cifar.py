"""The prepare stage on CIFAR-10's archive: downloaded, checked by md5, extracted safely and read
into the prepared arrays, or the previous ones left as they were."""

import hashlib
import http.server
import os
import pickle
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnpipe import PipelineError
from cnnpipe.data.preparation import prepare
from cnnpipe.data.prepared import IMAGES, LABELS, MANIFEST, Prepared
from tests.helpers import add_member, composed, make_archive

PREPARED = sorted([IMAGES, LABELS, MANIFEST])


def fetch(url: str, md5: str, dest: Path, timeout_s: float = 60) -> None:
    """The prepare stage's work on CIFAR-10 from `url`."""
    data = OmegaConf.merge(composed().data, {"source": url, "md5": md5, "timeout_s": timeout_s})
    prepare(data, dest)


def test_fetch_over_http_extracts_all_batches(tmp_path, archive, http_server):
    base, www = http_server
    path, md5 = archive
    (www / path.name).write_bytes(path.read_bytes())
    dest = tmp_path / "data" / "cifar-10-batches-py"
    fetch(f"{base}/{path.name}", md5, dest)
    assert sorted(p.name for p in dest.iterdir()) == PREPARED
    prepared = Prepared.open(dest)
    assert prepared.manifest.source == f"{base}/{path.name}"
    # 5 batches of 40 training images, then 50 test images, as make_archive wrote them.
    assert prepared.images.shape == (250, 32, 32, 3)
    assert [f["split"] for f in prepared.manifest.files] == ["train"] * 200 + ["test"] * 50
    assert [p.name for p in dest.parent.iterdir()] == [dest.name], "no temporary files left"


def test_fetch_accepts_plain_paths_and_file_urls(tmp_path, archive):
    path, md5 = archive
    fetch(str(path), md5, tmp_path / "a")
    fetch(path.as_uri(), md5, tmp_path / "b")
    assert (tmp_path / "a" / IMAGES).read_bytes() == (tmp_path / "b" / IMAGES).read_bytes()


def test_bad_checksum_leaves_nothing_behind(tmp_path, archive, http_server):
    base, www = http_server
    path, _ = archive
    (www / path.name).write_bytes(path.read_bytes())
    dest = tmp_path / "data" / "cifar-10-batches-py"
    with pytest.raises(PipelineError, match="md5"):
        fetch(f"{base}/{path.name}", "0" * 32, dest)
    assert list(dest.parent.iterdir()) == []


def test_unreachable_host_says_how_to_use_a_local_copy(tmp_path, http_server):
    base, _ = http_server
    with pytest.raises(
        PipelineError,
        match="Point source and md5 at an archive on disk in conf/local/data/cifar10.yaml",
    ) as error:
        fetch(f"{base}/missing.tar.gz", "0" * 32, tmp_path / "data" / "x")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "data").iterdir()) == []


def test_not_an_archive_is_refused(tmp_path):
    page = tmp_path / "error.html"
    page.write_text("<html>503 Service Unavailable</html>")
    md5 = hashlib.md5(page.read_bytes()).hexdigest()
    with pytest.raises(PipelineError, match=r"not a readable .tar.gz or .zip archive"):
        fetch(str(page), md5, tmp_path / "data" / "x")
    assert list((tmp_path / "data").iterdir()) == []


def _symlink(tar):
    info = tarfile.TarInfo("cifar-10-batches-py/evil")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _device(tar):
    info = tarfile.TarInfo("cifar-10-batches-py/dev")
    info.type = tarfile.CHRTYPE
    tar.addfile(info)


@pytest.mark.parametrize(
    "extra, message",
    [
        (lambda tar: add_member(tar, "/tmp/cnnpipe-evil", b"x"), "outside the target"),
        (lambda tar: add_member(tar, "cifar-10-batches-py/../../evil", b"x"), "outside the target"),
        (_symlink, "link or device"),
        (_device, "link or device"),
    ],
    ids=["absolute", "dotdot", "symlink", "device"],
)
def test_unsafe_members_are_refused(tmp_path, extra, message):
    path = tmp_path / "evil.tar.gz"
    md5 = make_archive(path, per_batch=2, test=2, extra=extra)
    with pytest.raises(PipelineError, match=message):
        fetch(str(path), md5, tmp_path / "data" / "x")
    assert list((tmp_path / "data").iterdir()) == []
    assert not Path("/tmp/cnnpipe-evil").exists()


def test_missing_batch_file_is_named(tmp_path):
    path = tmp_path / "partial.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-py/data_batch_1", b"x")
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(PipelineError, match="test_batch"):
        fetch(str(path), md5, tmp_path / "data" / "x")


def test_existing_output_is_replaced_only_on_success(tmp_path, archive):
    path, md5 = archive
    dest = tmp_path / "data" / "cifar-10-batches-py"
    fetch(str(path), md5, dest)
    before = (dest / IMAGES).read_bytes()
    with pytest.raises(PipelineError):
        fetch(str(path), "0" * 32, dest)
    assert (dest / IMAGES).read_bytes() == before


class Misbehaving(http.server.BaseHTTPRequestHandler):
    """/stall sends headers then nothing; /cut promises 1000 bytes and closes after 400;
    /cut-unsized sends 400 bytes of a gzip stream with no length and closes."""

    def do_GET(self):
        self.send_response(200)
        if self.path == "/stall":
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(3)
        elif self.path == "/cut":
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"x" * 398)
        else:
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"x" * 398)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def misbehaving_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "path, message",
    [
        ("/stall", "sent nothing for 0.5 s; try again later or raise data.timeout_s"),
        ("/cut", r"stopped part way \(400 of 1000 bytes\); run the stage again"),
        ("/cut-unsized", "md5 of .* is [0-9a-f]{32}, expected"),
    ],
    ids=["timeout", "truncated", "truncated-no-length"],
)
def test_broken_transfers_leave_nothing_behind(tmp_path, misbehaving_server, path, message):
    dest = tmp_path / "data" / "cifar-10-batches-py"
    with pytest.raises(PipelineError, match=message) as error:
        fetch(misbehaving_server + path, "0" * 32, dest, timeout_s=0.5)
    assert "\n" not in str(error.value)
    assert list(dest.parent.iterdir()) == []


def test_extra_members_are_not_extracted(tmp_path):
    path = tmp_path / "extra.tar.gz"

    def extra(tar):
        add_member(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
        add_member(tar, "cifar-10-batches-py/data_batch_6", b"x" * 100)
        add_member(tar, "notes.txt", b"x")

    md5 = make_archive(path, per_batch=2, test=2, extra=extra)
    dest = tmp_path / "data" / "x"
    fetch(str(path), md5, dest)
    assert sorted(p.name for p in dest.iterdir()) == PREPARED
    assert len(Prepared.open(dest).labels) == 12


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "payload, reason",
    [
        (pickle.dumps(RunsCode()), "is not a safe CIFAR batch (refusing to load posix.system)"),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
            "labels must lie in 0..9",
        ),
    ],
    ids=["runs-code", "bad-labels"],
)
def test_an_archive_of_unsafe_batches_never_replaces_good_data(
    tmp_path, archive, monkeypatch, payload, reason
):
    monkeypatch.chdir(tmp_path)
    good, md5 = archive
    dest = tmp_path / "data" / "cifar-10-batches-py"
    fetch(str(good), md5, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(good) as source, tarfile.open(bad, "w:gz") as tar:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith("data_batch_3"):
                data = payload
            add_member(tar, member.name, data)
    want = f"{bad.as_uri()}: cifar-10-batches-py/data_batch_3 {reason}; {dest} was left as it was"
    with pytest.raises(PipelineError) as error:
        fetch(str(bad), hashlib.md5(bad.read_bytes()).hexdigest(), dest)
    assert str(error.value) == want.replace("data_batch_3 labels", "data_batch_3: labels")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert not (tmp_path / "pwned").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["cifar-10-batches-py"]


def test_the_prepared_images_are_the_batches_pixels(tmp_path, archive):
    """Row i is image i of the batches, as (32, 32, 3): channel planes of 1,024 pixels each."""
    import pickle as pkl

    path, md5 = archive
    fetch(str(path), md5, tmp_path / "p")
    prepared = Prepared.open(tmp_path / "p")
    with tarfile.open(path) as tar:
        member = tar.extractfile("cifar-10-batches-py/data_batch_2").read()
    batch = pkl.loads(member)
    want = batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(prepared.images.array[40:80], want)
    assert prepared.labels[40:80].tolist() == batch["labels"]
    assert prepared.manifest.classes[0] == "airplane"
