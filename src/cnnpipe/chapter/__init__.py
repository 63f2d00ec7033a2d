"""The chapter's claims about CNNs, measured (measures.py), drawn (plots.py) and reported
(report.py).

May import: cnnpipe.base, cnnpipe.data, cnnpipe.tracking, cnnpipe.training, cnnpipe.artifact.
"""
