"""One module per stage of dvc.yaml: a thin `main()` over functions of the packages below it; no
stage imports another.

May import: cnnpipe.base, cnnpipe.data, cnnpipe.tracking, cnnpipe.training, cnnpipe.artifact,
cnnpipe.serving, cnnpipe.chapter.
"""
