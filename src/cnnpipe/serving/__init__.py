"""Serving: the exported ONNX model in onnxruntime, numpy and Pillow, with no torch, Lightning or
MLflow (MLflow only to fetch a models:/ URI), so a deployment needs nothing else; what it keeps
of its answers (capture.py) and the page to label them (review.py).

May import: cnnpipe.base, cnnpipe.data.images, cnnpipe.artifact.contract,
cnnpipe.tracking.registry.
"""
