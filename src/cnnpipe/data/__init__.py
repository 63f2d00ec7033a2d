"""Images in: CIFAR-10's archive or a folder of images, downloaded, checked and decoded once into
the same uint8 arrays and class names (preparation.py); the splits and batches (loader.py). The
one image decoder is here too, shared with serving (images.py), and the measure of how far the
images a model meets drift from its test split (drift.py).

May import: cnnpipe.base.
"""
