"""The tests' fixtures: a tiny archive, its data, a project folder, an HTTP server; the
helpers they share are in tests/helpers.py."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CONF, TINY, folder_over_http, make_archive

# MLflow keeps the store and experiment a command chose in these, which every later subprocess
# of the test run would inherit: no test starts or ends with them.
MLFLOW_CHOICES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def no_mlflow_store_left() -> Iterator[None]:
    for key in MLFLOW_CHOICES:
        os.environ.pop(key, None)
    yield
    for key in MLFLOW_CHOICES:
        os.environ.pop(key, None)


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "cifar-10-python.tar.gz"
    return path, make_archive(path)


@pytest.fixture
def data_dir(tmp_path: Path, archive: tuple[Path, str]) -> Path:
    """The tiny archive, prepared by the prepare stage's own function."""
    from omegaconf import OmegaConf

    from cnnpipe.data.preparation import prepare
    from tests.helpers import composed

    dest = tmp_path / "prepared"
    # Without the repository's labelled images (data.extra_train): the tests make their own.
    given = {"source": str(archive[0]), "md5": archive[1], "extra_train": None}
    prepare(OmegaConf.merge(composed().data, given), dest)
    return dest


@pytest.fixture
def project(tmp_path: Path, data_dir: Path, monkeypatch) -> tuple[Path, list[str]]:
    """A folder laid out like the repository, with conf/, a params.yaml for the tiny data and its
    own MLflow store (sqlite:///<folder>/mlflow.db); the tests run in it. Yields the folder and
    the overrides that made params.yaml."""
    from cnnpipe.base.config import compose_params

    repo = tmp_path / "repo"
    shutil.copytree(CONF, repo / "conf")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    tiny = [f"paths.data={data_dir}", *TINY, "callbacks.progress_bar.refresh_rate=0"]
    (repo / "params.yaml").write_text(compose_params(tiny, conf_dir=repo / "conf"))
    return repo, tiny


@pytest.fixture
def http_server(tmp_path: Path):
    """Serve tmp_path/www over HTTP on a free port of 127.0.0.1; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    with folder_over_http(root) as base:
        yield base, root


@pytest.fixture(scope="session")
def cluster():
    """A one-node SLURM cluster and a PostgreSQL server (tools/local_cluster.py) for the whole
    session, stopped at its end; the tests that need it are skipped where it cannot start."""
    from tools.local_cluster import ClusterError, LocalCluster

    # Not under pytest's own temporary folder: munge and postgres must be able to enter it.
    folder = Path(tempfile.mkdtemp(prefix="cnnpipe-cluster-"))
    try:
        started = LocalCluster(folder).start()
    except ClusterError as error:
        pytest.skip(f"no local cluster here: {str(error).splitlines()[0]}")
    yield started
    started.stop()
    shutil.rmtree(folder, ignore_errors=True)


def pytest_terminal_summary(terminalreporter) -> None:
    """The figures tests record (`record_property("figure", ...)`), at the end of the run's
    output: the cluster's timings, for the log of CI (which runs the tests in 2 workers)."""
    figures = [
        f"{report.nodeid.split('::')[-1]}: {value}"
        for report in terminalreporter.stats.get("passed", [])
        for key, value in report.user_properties
        if key == "figure" and report.when == "call"
    ]
    if figures:
        terminalreporter.section("figures")
        for line in figures:
            terminalreporter.write_line(line)
