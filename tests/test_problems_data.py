"""nhgd_ext.problems.data: the IDX reader on files written here, seeded label
noise and seeded splits, the embedded digits."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from nhgd_ext.problems import data


def write_idx(path, array: np.ndarray, *, code: int = 0x08, gz: bool = False, magic: bytes | None = None) -> str:
    """An IDX file from first principles: two zero bytes, dtype code, ndim,
    big-endian uint32 dims, big-endian data."""
    dtype = data.IDX_DTYPES[code]
    header = magic if magic is not None else struct.pack(">BBBB", 0, 0, code, array.ndim)
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(dtype).tobytes()
    path = str(path) + (".gz" if gz else "")
    with (gzip.open if gz else open)(path, "wb") as handle:
        handle.write(payload)
    return path


def write_mnist_folder(folder, *, n_train=60, n_test=23, rows=5, cols=3, gz=False, skip=()):
    """A tiny MNIST-style folder: labels i % 10, pixels from a fixed RandomState."""
    rng = np.random.RandomState(0)
    arrays = {
        "train_images": rng.randint(0, 256, size=(n_train, rows, cols)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.randint(0, 256, size=(n_test, rows, cols)),
        "test_labels": (np.arange(n_test) * 7) % 10,
    }
    for key, stem in data.IDX_FILES.items():
        if key not in skip:
            write_idx(folder / stem, arrays[key], gz=gz)
    return arrays


# ------------------------------------------------------------------ IDX files


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("code", sorted(data.IDX_DTYPES), ids=lambda c: f"0x{c:02x}")
def test_read_idx_round_trips_every_dtype(tmp_path, gz, code):
    rng = np.random.RandomState(code)
    array = rng.randint(0, 100, size=(7, 3, 2)).astype(data.IDX_DTYPES[code])
    path = write_idx(tmp_path / "x-idx3", array, code=code, gz=gz)
    back = data.read_idx(path)
    assert back.shape == (7, 3, 2)
    assert back.dtype == data.IDX_DTYPES[code].newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_read_idx_one_dimensional_labels(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5], dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "l", labels, gz=True)), labels)


def test_read_idx_rejects_a_bad_magic_number(tmp_path):
    path = write_idx(tmp_path / "bad", np.zeros((2, 2)), magic=struct.pack(">BBBB", 1, 0, 8, 2))
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(path)


def test_read_idx_rejects_an_unknown_dtype_code(tmp_path):
    path = write_idx(tmp_path / "bad", np.zeros((2, 2)), magic=struct.pack(">BBBB", 0, 0, 0x07, 2))
    with pytest.raises(ValueError, match="dtype code"):
        data.read_idx(path)


def test_read_idx_rejects_a_size_that_does_not_match_the_header(tmp_path):
    path = write_idx(tmp_path / "short", np.zeros((4, 3)))
    with open(path, "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ValueError, match=r"dims \(4, 3\)"):
        data.read_idx(path)


def test_read_idx_rejects_a_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "fake.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="fake.gz"):
        data.read_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_idx_folder_reads_the_four_files(tmp_path, gz):
    arrays = write_mnist_folder(tmp_path, gz=gz)
    loaded = data.load_idx_folder(tmp_path)
    assert loaded.x.shape == (60, 15) and loaded.test_x.shape == (23, 15)
    assert loaded.image_shape == (5, 3) and loaded.num_classes == 10
    np.testing.assert_allclose(loaded.x, arrays["train_images"].reshape(60, -1) / 255.0)
    np.testing.assert_array_equal(loaded.test_y, arrays["test_labels"])
    assert loaded.x.min() >= 0 and loaded.x.max() <= 1


def test_load_idx_folder_names_every_missing_file_and_the_folder(tmp_path):
    write_mnist_folder(tmp_path, skip=("train_labels", "test_images"))
    with pytest.raises(FileNotFoundError) as info:
        data.load_idx_folder(tmp_path)
    message = str(info.value)
    assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert str(tmp_path) in message and "data_dir" in message


def test_load_idx_folder_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_idx_folder(tmp_path / "nowhere")


def test_load_idx_folder_rejects_mismatched_counts(tmp_path):
    write_mnist_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(59) % 10)
    with pytest.raises(ValueError, match="60 images but 59 labels"):
        data.load_idx_folder(tmp_path)


def test_load_idx_folder_rejects_a_malformed_file(tmp_path):
    write_mnist_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x08\x00\x00\x01")
    with pytest.raises(ValueError, match="magic"):
        data.load_idx_folder(tmp_path)


def test_read_idx_rejects_a_gzip_stream_damaged_inside(tmp_path):
    """One byte flipped inside the deflate stream: zlib's own error becomes a
    ValueError naming the file."""
    path = write_idx(tmp_path / "images", np.arange(400).reshape(4, 10, 10) % 256, gz=True)
    raw = bytearray(open(path, "rb").read())
    raw[33] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=r"images\.gz.*could not be read"):
        data.read_idx(path)


@pytest.mark.parametrize("part", ["train", "test"])
def test_load_idx_folder_rejects_files_without_images(tmp_path, part):
    write_mnist_folder(tmp_path)
    write_idx(tmp_path / data.IDX_FILES[f"{part}_images"], np.zeros((0, 5, 3)))
    write_idx(tmp_path / data.IDX_FILES[f"{part}_labels"], np.zeros(0))
    with pytest.raises(ValueError, match="holds no pixels"):
        data.load_idx_folder(tmp_path)


def test_load_idx_folder_rejects_a_stray_label_that_would_make_new_classes(tmp_path):
    write_mnist_folder(tmp_path)
    labels = np.arange(60) % 10
    labels[7] = 200
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*up to 200 but 190 classes have none"):
        data.load_idx_folder(tmp_path)


def test_load_idx_folder_rejects_a_test_label_outside_the_training_classes(tmp_path):
    write_mnist_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(23, 12))
    with pytest.raises(ValueError, match="label 12 is not one of the 10 training classes"):
        data.load_idx_folder(tmp_path)


# --------------------------------------------------------------------- digits


def test_digits_are_embedded_and_scaled_to_unit_interval():
    digits = data.load_images(None)
    assert digits.x.shape == (1797, 64) and digits.y.shape == (1797,)
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    assert set(np.unique(digits.y)) == set(range(10)) and digits.test_x is None
    with pytest.raises(ValueError):
        digits.x[0, 0] = 0.5  # shared cache: read-only


# ----------------------------------------------------------------- label noise


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.9])
def test_label_noise_rate_and_corrupted_labels_differ(rate):
    labels = np.arange(20000) % 10
    noisy, mask = data.inject_label_noise(labels, rate, 10, data.seeded_rng(3, 1))
    assert abs(mask.mean() - rate) < 0.015
    assert np.all(noisy[mask] != labels[mask])
    assert np.all(noisy[~mask] == labels[~mask])
    assert noisy.min() >= 0 and noisy.max() <= 9


def test_label_noise_is_uniform_over_the_other_classes():
    labels = np.zeros(27000, dtype=np.int64)
    noisy, mask = data.inject_label_noise(labels, 0.999, 10, data.seeded_rng(0, 1))
    counts = np.bincount(noisy[mask], minlength=10)
    assert counts[0] == 0
    expected = mask.sum() / 9
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_label_noise_is_deterministic_by_seed():
    labels = np.arange(997) % 7
    a = data.inject_label_noise(labels, 0.5, 7, data.seeded_rng(11, 1))
    b = data.inject_label_noise(labels, 0.5, 7, data.seeded_rng(11, 1))
    c = data.inject_label_noise(labels, 0.5, 7, data.seeded_rng(12, 1))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_label_noise_rejects_rates_outside_unit_interval(rate):
    with pytest.raises(ValueError, match="noise"):
        data.inject_label_noise(np.zeros(5, dtype=np.int64), rate, 10, data.seeded_rng(0, 1))


# ---------------------------------------------------------------------- splits


def test_splits_are_disjoint_sized_and_deterministic():
    sizes = {"n_train": 101, "n_val": 37, "test": None}
    a = data.split_indices(1000, sizes, data.seeded_rng(5, 0))
    b = data.split_indices(1000, sizes, data.seeded_rng(5, 0))
    c = data.split_indices(1000, sizes, data.seeded_rng(6, 0))
    assert [len(a[k]) for k in sizes] == [101, 37, 862]
    assert len(np.unique(np.concatenate(list(a.values())))) == 1000
    for key in sizes:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["n_train"], c["n_train"])


@pytest.mark.parametrize("sizes, name", [({"n_train": 0}, "n_train"), ({"n_train": 5, "n_val": -1}, "n_val"),
                                         ({"n_train": 2.5}, "n_train")])
def test_splits_reject_non_positive_sizes(sizes, name):
    with pytest.raises(ValueError, match=name):
        data.split_indices(100, sizes, data.seeded_rng(0, 0))


def test_splits_reject_sizes_beyond_the_data():
    with pytest.raises(ValueError, match="n_train=90, n_val=20"):
        data.split_indices(100, {"n_train": 90, "n_val": 20}, data.seeded_rng(0, 0))
    with pytest.raises(ValueError, match="non-empty rest"):
        data.split_indices(100, {"n_train": 60, "n_val": 40, "test": None}, data.seeded_rng(0, 0))


# ------------------------------------------------------------ embedded MNIST


def test_embedded_mnist_is_mlxtends_real_digits_scaled_to_unit_interval():
    mnist = data.load_images(None, "mnist")
    assert mnist.x.shape == (5000, 784) and mnist.image_shape == (28, 28) and mnist.test_x is None
    assert np.bincount(mnist.y).tolist() == [500] * 10
    assert mnist.x.min() == 0.0 and mnist.x.max() == 1.0
    # real handwriting: about a fifth of the pixels are ink, none of the images is blank
    assert 0.1 < float((mnist.x > 0).mean()) < 0.3 and bool((mnist.x.sum(1) > 10).all())
    with pytest.raises(ValueError):
        mnist.x[0, 0] = 0.5


def test_data_source_names_the_argument():
    assert data.data_source("mnist", None) == "mnist" and data.data_source("digits", "/x") == "idx"
    with pytest.raises(ValueError, match="argument 'data' must be one of digits, mnist"):
        data.data_source("cifar", None)
