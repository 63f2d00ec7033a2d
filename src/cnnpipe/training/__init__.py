"""A network trained and scored: the networks, sized from the data as Keras sizes them
(models.py); the LightningModule (classifier.py) and what a config builds for Lightning
(build.py); a training run (fit.py); the deployed function in PyTorch (inference.py), which the
test score (evaluation.py) and the per-epoch score (epoch_scoring.py) use; parameters as Keras
counts them (param_count.py).

May import: cnnpipe.base, cnnpipe.data, cnnpipe.tracking.
"""
