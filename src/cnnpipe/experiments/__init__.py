"""Training outside DVC: Hydra sweeps, the Optuna search, and the runs table."""
