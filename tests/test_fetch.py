import hashlib
import tarfile
from pathlib import Path

import pytest

from cnnpipe import PipelineError
from cnnpipe.fetch import BATCH_FILES, fetch
from conftest import add_member, make_archive


def test_fetch_over_http_extracts_all_batches(tmp_path, archive, http_server):
    base, www = http_server
    path, md5 = archive
    (www / path.name).write_bytes(path.read_bytes())
    dest = tmp_path / "data" / "cifar-10-batches-py"
    fetch(f"{base}/{path.name}", md5, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(BATCH_FILES)
    assert [p.name for p in dest.parent.iterdir()] == [dest.name], "no temporary files left"


def test_fetch_accepts_plain_paths_and_file_urls(tmp_path, archive):
    path, md5 = archive
    fetch(str(path), md5, tmp_path / "a")
    fetch(path.as_uri(), md5, tmp_path / "b")
    assert (tmp_path / "a" / "test_batch").read_bytes() == (
        tmp_path / "b" / "test_batch"
    ).read_bytes()


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
    with pytest.raises(PipelineError, match="data.url=/path/to/cifar-10-python.tar.gz") as error:
        fetch(f"{base}/missing.tar.gz", "0" * 32, tmp_path / "data" / "x")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "data").iterdir()) == []


def test_not_an_archive_is_refused(tmp_path):
    page = tmp_path / "error.html"
    page.write_text("<html>503 Service Unavailable</html>")
    md5 = hashlib.md5(page.read_bytes()).hexdigest()
    with pytest.raises(PipelineError, match="not a readable tar.gz"):
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
    before = (dest / "test_batch").read_bytes()
    with pytest.raises(PipelineError):
        fetch(str(path), "0" * 32, dest)
    assert (dest / "test_batch").read_bytes() == before
