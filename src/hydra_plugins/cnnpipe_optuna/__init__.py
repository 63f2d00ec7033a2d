"""cnnpipe's Optuna sweeper for Hydra: `hydra/sweeper=cnnpipe_optuna`, on current Optuna."""
