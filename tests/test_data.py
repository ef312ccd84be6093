import dataclasses
import functools
import hashlib
import http.server
import io
import json
import threading
import zipfile

import numpy as np
import pytest

import synthetic
from pneumonia import data
from pneumonia.errors import PipelineError

INFO = data.dataset_info()


def test_info_comes_from_medmnist():
    assert INFO.n_samples == {"train": 4708, "val": 524, "test": 624}
    assert INFO.labels == {"0": "normal", "1": "pneumonia"}
    assert INFO.md5 == "28209eda62fecd6e6a2d98b1501bb15f" and INFO.url.startswith("https://")


def _npz_bytes(arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _case(name):
    """Write one malformed file and return its path (builders below)."""
    good = synthetic.make_arrays()
    if name == "zero bytes":
        return b""
    if name == "not a zip":
        return b"this is not an npz file\n" * 10
    if name == "truncated zip":
        return _npz_bytes(good)[:100_000]
    if name == "pickle object array":
        bad = dict(good, train_labels=np.array([{"a": 1}] * 4708, dtype=object)[:, None])
        return _npz_bytes(bad)
    mutate = {
        "missing key": lambda a: {k: v for k, v in a.items() if k != "val_labels"},
        "extra key": lambda a: a | {"notes": np.zeros(3, np.uint8)},
        "float64 images": lambda a: a | {"train_images": a["train_images"].astype(np.float64)},
        "int64 labels": lambda a: a | {"test_labels": a["test_labels"].astype(np.int64)},
        "NaN in float images": lambda a: a | {"val_images": np.full((524, 28, 28), np.nan, np.float32)},
        "wrong rank": lambda a: a | {"train_images": a["train_images"][..., None]},
        "0-d images": lambda a: a | {"val_images": np.uint8(7)},
        "0-d labels": lambda a: a | {"test_labels": np.uint8(1)},
        "1-d labels": lambda a: a | {"train_labels": a["train_labels"][:, 0]},
        "one class only": lambda a: a | {"val_labels": np.ones((524, 1), np.uint8)},
        "mismatched counts": lambda a: a | {"test_labels": a["test_labels"][:-1]},
        "label 2": lambda a: a | {"train_labels": np.full((4708, 1), 2, np.uint8)},
        "label -1": lambda a: a | {"train_labels": np.full((4708, 1), -1, np.int8).astype(np.uint8)},
        "0 samples": lambda a: a | {"val_images": np.zeros((0, 28, 28), np.uint8), "val_labels": np.zeros((0, 1), np.uint8)},
        "wrong split size": lambda a: a | {"val_images": a["val_images"][:500], "val_labels": a["val_labels"][:500]},
    }[name]
    return _npz_bytes(mutate(good))


CASES = {
    "zero bytes": "empty",
    "not a zip": "not an .npz",
    "truncated zip": "truncated",
    "pickle object array": "pickle",
    "missing key": "missing: val_labels",
    "extra key": "unexpected: notes",
    "float64 images": "float64",
    "int64 labels": "int64",
    "NaN in float images": "float32",
    "wrong rank": "train_images has shape (4708, 28, 28, 1)",
    "0-d images": "val_images has shape ()",
    "0-d labels": "test_labels has shape () for 624 images; expected (624, 1)",
    "1-d labels": "train_labels has shape (4708,)",
    "one class only": "the val split has only label 1; every split needs both normal (0) and pneumonia (1)",
    "mismatched counts": "test_labels has shape",
    "label 2": "[2]",
    "label -1": "[255]",
    "0 samples": "0 samples",
    "wrong split size": "500 samples",
}


@pytest.mark.parametrize("name", CASES)
def test_malformed_files_give_one_clear_line(tmp_path, name):
    path = tmp_path / "bad.npz"
    path.write_bytes(_case(name))
    with pytest.raises(PipelineError) as err:
        data.load_npz(path, INFO)
    message = str(err.value)
    assert CASES[name] in message, message
    assert str(path) in message and "\n" not in message


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        data.load_npz(tmp_path / "nope.npz", INFO)
    with pytest.raises(PipelineError, match="is a directory"):
        data.load_npz(tmp_path, INFO)


def test_unreadable_file_is_one_line(tmp_path, synthetic_npz, monkeypatch):
    # Tests run as root, where chmod 000 still reads: the read error is simulated for this one path.
    real_open = open

    def failing_open(file, *args, **kwargs):
        if str(file) == str(synthetic_npz):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(data, "open", failing_open, raising=False)  # data.py's open(), nothing else
    out = tmp_path / "raw" / "pneumoniamnist.npz"
    with pytest.raises(PipelineError) as err:
        data.fetch(str(synthetic_npz), out, INFO)
    assert str(err.value) == (f"data: cannot read {synthetic_npz} (Permission denied); check its permissions or "
                              "point data.source at a readable .npz")
    assert not (tmp_path / "raw").exists()


def test_local_source_warns_on_md5_and_records_provenance(tmp_path, synthetic_npz):
    out = tmp_path / "raw" / "pneumoniamnist.npz"
    provenance = data.fetch(str(synthetic_npz), out, INFO)
    assert out.read_bytes() == synthetic_npz.read_bytes()
    assert provenance["source"] == "local" and provenance["md5"] == data.md5sum(synthetic_npz)
    assert INFO.md5 in provenance["warning"] and provenance["md5"] in provenance["warning"]
    assert sum(provenance["class_counts"]["test"].values()) == 624


def _serve(directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_checks_md5_and_caches(tmp_path, synthetic_npz):
    # The real download code against a local HTTP server standing in for Zenodo.
    served = tmp_path / "www"
    served.mkdir()
    (served / "pneumoniamnist.npz").write_bytes(synthetic_npz.read_bytes())
    server = _serve(served)
    try:
        url = f"http://127.0.0.1:{server.server_port}/pneumoniamnist.npz"
        md5 = hashlib.md5(synthetic_npz.read_bytes()).hexdigest()
        info = data.DatasetInfo(url, md5, INFO.n_samples, INFO.labels, INFO.license)
        cache = tmp_path / "cache"
        path = data.download(info, cache)
        assert path.read_bytes() == synthetic_npz.read_bytes()
        (served / "pneumoniamnist.npz").unlink()  # a second call must not need the network
        assert data.download(info, cache) == path

        bad = data.DatasetInfo(url.replace("pneumoniamnist", "other"), "0" * 32, INFO.n_samples, INFO.labels, INFO.license)
        (served / "other.npz").write_bytes(b"corrupted")
        with pytest.raises(PipelineError, match="could not fetch"):
            data.download(bad, tmp_path / "cache2")
    finally:
        server.shutdown()


def test_failed_download_names_url_and_offline_alternative(tmp_path):
    info = data.DatasetInfo("http://127.0.0.1:9/pneumoniamnist.npz", INFO.md5, INFO.n_samples, INFO.labels, INFO.license)
    with pytest.raises(PipelineError) as err:
        data.download(info, tmp_path)
    assert info.url in str(err.value) and "data.source" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_resize_keeps_uint8_single_channel():
    images = synthetic.make_arrays()["test_images"][:5]
    out = data.resize_images(images, 64, "bilinear")
    assert out.shape == (5, 64, 64) and out.dtype == np.uint8
    assert abs(float(out.mean()) - float(images.mean())) < 2
    nearest = data.resize_images(images, 56, "nearest")
    assert np.array_equal(nearest[:, ::2, ::2], images)


@pytest.mark.parametrize("size", data.SIZES)
def test_each_data_size_names_its_official_file_and_validates_its_shape(tmp_path, size):
    info = data.dataset_info(size)
    assert info.size == size and info.n_samples == INFO.n_samples and len(info.md5) == 32
    assert info.filename == ("pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz")
    assert info.url.split("?")[0].endswith(info.filename)  # MedMNIST+'s own url_<size> for that file
    assert data.origin_of("medmnist", size).name == info.filename
    # Fewer images than PneumoniaMNIST (a 224 px file of the real split sizes is 294 MB): the shapes are the point.
    small = synthetic.PIPELINE_SIZES
    path = synthetic.write(tmp_path / f"s{size}.npz", size=size, sizes=small)
    arrays = data.load_npz(path, dataclasses.replace(info, n_samples=small))
    assert arrays["train_images"].shape == (small["train"], size, size)
    other = 64 if size == 28 else 28
    with pytest.raises(PipelineError) as err:  # a file of another size: named, with both ways out
        data.load_npz(path, dataclasses.replace(data.dataset_info(other), n_samples=small))
    assert str(err.value) == (f"data: {path} holds {size}x{size} images but data.size is {other}; "
                              f"set data.size={size} or use the {other} px file")


def test_a_non_medmnist_shape_gets_the_expected_shape_for_data_size(tmp_path):
    path = synthetic.write(tmp_path / "odd.npz", size=28)
    arrays = dict(np.load(path))
    np.savez(path, **(arrays | {"val_images": np.zeros((524, 30, 30), np.uint8)}))
    with pytest.raises(PipelineError, match=r"val_images has shape \(524, 30, 30\); expected \(N, 28, 28\) grayscale "
                                            r"\(data.size 28\)"):
        data.load_npz(path, INFO)


def test_native_size_download_fetches_that_size_file_md5_checked(tmp_path, monkeypatch):
    """data.size 64 through the real fetch and download code, a local HTTP server standing in for Zenodo."""
    npz64 = synthetic.write(tmp_path / "pneumoniamnist_64.npz", size=64)
    served = tmp_path / "www"
    served.mkdir()
    (served / "pneumoniamnist_64.npz").write_bytes(npz64.read_bytes())
    server = _serve(served)
    real = data.dataset_info(64)
    info = data.DatasetInfo(f"http://127.0.0.1:{server.server_port}/pneumoniamnist_64.npz?download=1",
                            data.md5sum(npz64), real.n_samples, real.labels, real.license, 64)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    try:
        raw = tmp_path / "raw" / "pneumoniamnist.npz"
        provenance = data.fetch("medmnist", raw, info)
        assert (tmp_path / "cache" / "pneumoniamnist_64.npz").read_bytes() == npz64.read_bytes() == raw.read_bytes()
        assert provenance["size"] == 64 and provenance["md5"] == info.md5 and "warning" not in provenance
        assert data.is_current("medmnist", raw, provenance, 64)
        assert not data.is_current("medmnist", raw, provenance, 28)  # another size: fetched anew
        wrong = data.DatasetInfo(info.url, "0" * 32, real.n_samples, real.labels, real.license, 64)
        (tmp_path / "cache" / "pneumoniamnist_64.npz").unlink()
        with pytest.raises(PipelineError, match="could not fetch"):  # a file failing its MD5 is refused
            data.fetch("medmnist", tmp_path / "raw2" / "pneumoniamnist.npz", wrong)
        assert not (tmp_path / "raw2").exists()
    finally:
        server.shutdown()
