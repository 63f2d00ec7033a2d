"""Training outside DVC: Hydra sweeps, the Optuna search, and the runs table. As in the stages,
torch, Lightning and MLflow load inside the functions that use them, past the configuration check.

May import: cnnpipe.base, cnnpipe.data, cnnpipe.tracking, cnnpipe.training, cnnpipe.artifact.
"""
