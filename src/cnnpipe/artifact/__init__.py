"""The deployable file: the ONNX interface and its metadata, numpy only (contract.py); a trained
network as one checked ONNX file (onnx_export.py); its INT8 copy (quantization.py).

May import: cnnpipe.base, cnnpipe.data, cnnpipe.tracking, cnnpipe.training.
"""
