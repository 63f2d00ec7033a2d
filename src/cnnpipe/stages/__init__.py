"""One module per stage of dvc.yaml: a thin `main()` over functions of the packages below it; no
stage imports another. What needs torch, Lightning or MLflow is imported inside the function that
uses it, once the arguments and params.yaml are checked: `--help` and a refused value answer in a
fraction of a second, not after seconds of imports.

May import: cnnpipe.base, cnnpipe.data, cnnpipe.tracking, cnnpipe.training, cnnpipe.artifact,
cnnpipe.serving, cnnpipe.chapter.
"""
