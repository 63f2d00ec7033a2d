"""Serving: the exported ONNX model in onnxruntime, numpy and Pillow, with no torch, Lightning or
MLflow (MLflow only to fetch a models:/ URI), so a deployment needs nothing else; what it keeps
of its answers (capture.py), the page to label them (review.py), and how far they drift from the
test split (drift.py, monitor.py).

May import: cnnpipe.base, cnnpipe.data.images, cnnpipe.data.drift, cnnpipe.artifact.contract,
cnnpipe.tracking.registry.
"""
