"""The chapter's claims about CNNs, measured (measures.py), drawn (plots.py) and reported
(report.py)."""
