"""Before a stage works: does the store take an artifact? MLflow retries a failed upload inside
its client, for about five minutes, and only after the work; a small file uploaded and deleted
with few retries says in seconds, in one line, that a bucket is missing, refuses the
credentials, or does not answer."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow

from cnnpipe import PipelineError
from cnnpipe.tracking.store import answers, store_problem

# The file the probe puts among the run's artifacts, and deletes.
PROBE = ".cnnpipe-probe"
# What the server's log says when only the server can tell.
SERVER_LOG = (
    "read the server's log: NoSuchBucket (its --artifacts-destination bucket does not exist), "
    "SignatureDoesNotMatch or InvalidAccessKeyId (the bucket refuses the server's credentials), "
    "Could not connect to the endpoint URL (the bucket's gateway is down)"
)


@contextlib.contextmanager
def few_retries() -> Iterator[None]:
    """MLflow's HTTP requests without their retries (7, over minutes, by default)."""
    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    saved = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key)
        else:
            os.environ[key] = saved


def check_artifacts(artifact_uri: str) -> None:
    """Upload a small file under `artifact_uri` (a run's) and delete it; PipelineError says why
    the store did not take it."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repository = get_artifact_repository(artifact_uri)
    with few_retries(), tempfile.TemporaryDirectory() as tmp:
        # A file, not a folder: a bucket may keep an emptied folder's name.
        probe = Path(tmp) / PROBE
        probe.write_text("cnnpipe checks that the store takes artifacts before a stage works\n")
        try:
            repository.log_artifact(str(probe))
            with contextlib.suppress(NotImplementedError):
                repository.delete_artifacts(PROBE)
        # Whatever the artifact store raised (boto3's, MLflow's, the network's, the disk's)
        # is the store's problem, and the stage has not begun.
        except Exception as error:  # noqa: BLE001
            uri = mlflow.get_tracking_uri()
            problem = artifact_problem(error, artifact_uri)
            raise PipelineError(f"MLflow store {uri}: {problem}") from None


def artifact_problem(error: Exception, artifact_uri: str) -> str:
    """Why a test upload to `artifact_uri` failed, in words, and what to do."""
    causes, cause = [], error
    while cause is not None and len(causes) < 5:
        causes.append(f"{type(cause).__name__} {cause}")
        cause = cause.__cause__ or cause.__context__
    text = " ".join(causes).lower()
    where = artifact_uri.split("/")[2] if artifact_uri.startswith("s3://") else ""
    if "nosuchbucket" in text or "bucket does not exist" in text:
        return f"the bucket {where} does not exist; create it, or fix the artifact location"
    refused = ("signaturedoesnotmatch", "invalidaccesskeyid", "accessdenied", "(403)")
    if any(code in text for code in refused):
        return (
            f"the bucket {where} refuses these credentials; fix AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY"
        )
    if "endpointconnectionerror" in text or "could not connect to the endpoint" in text:
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL", "AWS's")
        return f"the bucket's endpoint {endpoint} does not answer; start it, or fix the URL"
    if artifact_uri.startswith("mlflow-artifacts:") and answers(mlflow.get_tracking_uri()):
        return f"the server cannot store artifacts (a test upload failed; it answers): {SERVER_LOG}"
    return store_problem(error)
