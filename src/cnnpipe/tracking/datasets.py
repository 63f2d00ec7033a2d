"""The prepared data as MLflow datasets: by content, with the source it was read from."""

import json
import warnings

import numpy as np
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import Schema, TensorSpec
from omegaconf import DictConfig

from cnnpipe.data.loader import test_mask
from cnnpipe.data.prepared import Manifest, Prepared


def mlflow_dataset(prepared: Prepared, rows: np.ndarray | None = None) -> MetaDataset:
    """The prepared data by content, as an MLflow dataset with the source the prepare stage read
    and the images' shape as its schema: every image (named data.name, what training reads), or
    `rows` of it."""
    manifest = prepared.manifest
    with warnings.catch_warnings():
        # MLflow registers its local-file source class twice and warns that it is ambiguous.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(manifest.source)
    size = manifest.image_size
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "images")])
    name = manifest.name if rows is None else f"{manifest.name}-test"
    return MetaDataset(source, name, manifest.digest(rows), schema)


def scored_dataset(cfg: DictConfig) -> MetaDataset:
    """The test split as an MLflow dataset ("<name>-test"): what the models are scored on."""
    prepared = Prepared.open(cfg.paths.data)
    return mlflow_dataset(prepared, np.flatnonzero(test_mask(prepared, cfg.data, cfg.seed)[0]))


def dataset_tags(manifest: Manifest) -> dict[str, str]:
    """What a run's training input says of the data beside its digest: size and class counts."""
    return {
        "image_size": f"{manifest.image_size}x{manifest.image_size}",
        "images": str(len(manifest.files)),
        "class_counts": json.dumps(manifest.class_counts()),
    }
