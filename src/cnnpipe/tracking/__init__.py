"""MLflow: the store (store.py), whether it takes artifacts before a stage works (probe.py), the
run a stage works in (stage_run.py), what a run ran (lineage.py), the data as datasets
(datasets.py) and the model registry (registry.py).

May import: cnnpipe.base, cnnpipe.data.
"""
