"""Training outside DVC: Hydra sweeps, the Optuna search, and the runs table.

May import: cnnpipe.base, cnnpipe.data, cnnpipe.tracking, cnnpipe.training, cnnpipe.artifact.
"""
