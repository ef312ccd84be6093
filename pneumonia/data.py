"""PneumoniaMNIST: metadata, download or local file, validation and resizing."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia.errors import PipelineError

SPLITS = ("train", "val", "test")
FLAG = "pneumoniamnist"
SIZES = (28, 64, 128, 224)  # MedMNIST v2's 28 px, and MedMNIST+'s native 64, 128 and 224 px files
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pneumonia-pipeline"


def official_filename(size: int) -> str:
    """The official file's name: pneumoniamnist.npz at 28 px, pneumoniamnist_<size>.npz otherwise."""
    return f"{FLAG}.npz" if size == 28 else f"{FLAG}_{size}.npz"


@dataclass(frozen=True)
class DatasetInfo:
    url: str
    md5: str
    n_samples: dict
    labels: dict
    license: str
    size: int = 28  # image side in pixels

    @property
    def filename(self) -> str:
        return official_filename(self.size)


def dataset_info(size: int = 28) -> DatasetInfo:
    """PneumoniaMNIST's URL and MD5 at `size` px, split sizes and label names, from medmnist.INFO."""
    # medmnist prints a "please install" notice when torch is absent; only INFO is needed here.
    with contextlib.redirect_stdout(io.StringIO()):
        from medmnist import INFO
    info = INFO[FLAG]
    url, md5 = (info["url"], info["MD5"]) if size == 28 else (info[f"url_{size}"], info[f"MD5_{size}"])
    return DatasetInfo(url, md5, dict(info["n_samples"]), dict(info["label"]), info["license"], size)


def md5sum(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(info: DatasetInfo, cache_dir: Path | None = None) -> Path:
    """Download the official file once (MD5-checked) into a cache outside the DVC outputs."""
    cache_dir = cache_dir or CACHE_DIR
    cached = cache_dir / info.filename
    if cached.is_file() and md5sum(cached) == info.md5:  # already here: no network, and no Keras import
        return cached
    import keras

    cache_dir.mkdir(parents=True, exist_ok=True)  # else get_file silently falls back to /tmp/.keras
    # A partial or outdated copy: Keras would announce "we will re-download" first, misleading when offline.
    cached.unlink(missing_ok=True)
    try:
        path = keras.utils.get_file(
            fname=info.filename, origin=info.url, file_hash=info.md5, hash_algorithm="md5", cache_dir=str(cache_dir), cache_subdir="."
        )
    except Exception as exc:  # network errors come in many types; all get the same advice
        cached.unlink(missing_ok=True)  # Keras keeps a download that failed its MD5 check (an error page, a cut transfer)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"download: could not fetch {info.url} ({reason}); offline, set data.source to a local "
            f"PneumoniaMNIST .npz (e.g. dvc exp run -S data.source=path/to/pneumoniamnist.npz)"
        ) from None
    return Path(path)


def load_npz(path: str | Path, info: DatasetInfo) -> dict[str, np.ndarray]:
    """Load a MedMNIST-layout .npz and check everything the pipeline relies on."""
    path = Path(path)
    name = str(path)
    if path.is_dir():
        raise PipelineError(f"data: {name} is a directory; point data.source at a .npz file")
    if not path.exists():
        raise PipelineError(f"data: {name} does not exist; set data.source to 'medmnist' or to an existing .npz")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(4)
    except OSError as exc:  # unreadable: permissions, a broken disk, a special file
        raise PipelineError(
            f"data: cannot read {name} ({exc.strerror or exc}); check its permissions or point data.source at a readable .npz"
        ) from None
    if size == 0:
        raise PipelineError(f"data: {name} is empty (0 bytes); download it again or fix data.source")
    if header != b"PK\x03\x04":  # every .npz is a zip archive
        raise PipelineError(f"data: {name} is not an .npz file (no zip header); point data.source at a MedMNIST .npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise PipelineError(f"data: {name} contains pickled objects, which are refused for safety; save plain uint8 arrays") from None
        raise PipelineError(f"data: {name} is not a valid .npz ({exc}); download it again") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PipelineError(f"data: {name} is truncated or not an .npz file ({exc}); download it again") from None
    validate(arrays, info, name)
    return arrays


def validate(arrays: dict[str, np.ndarray], info: DatasetInfo, name: str = "data") -> None:
    expected = {f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")}
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        raise PipelineError(
            f"data: {name} has wrong keys (missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'}); "
            f"expected {', '.join(sorted(expected))}"
        )
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise PipelineError(
                f"data: {name}: {split} images/labels are {images.dtype}/{labels.dtype}; both must be uint8 as in MedMNIST"
            )
        side = info.size
        if images.ndim == 3 and images.shape[1] == images.shape[2] and images.shape[1] in SIZES and side != images.shape[1]:
            raise PipelineError(
                f"data: {name} holds {images.shape[1]}x{images.shape[1]} images but data.size is {side}; "
                f"set data.size={images.shape[1]} or use the {side} px file"
            )
        if images.ndim != 3 or images.shape[1:] != (side, side):
            raise PipelineError(
                f"data: {name}: {split}_images has shape {images.shape}; expected (N, {side}, {side}) grayscale "
                f"(data.size {side})"
            )
        if labels.shape != (len(images), 1):  # a shape comparison: len() fails on 0-d arrays
            raise PipelineError(
                f"data: {name}: {split}_labels has shape {labels.shape} for {len(images)} images; expected ({len(images)}, 1)"
            )
        if len(images) == 0:
            raise PipelineError(f"data: {name}: the {split} split has 0 samples")
        bad = np.setdiff1d(np.unique(labels), [0, 1])
        if bad.size:
            raise PipelineError(f"data: {name}: {split} labels contain {bad.tolist()}; only 0 (normal) and 1 (pneumonia) are allowed")
        if np.unique(labels).size < 2:  # sensitivity, specificity and AUC need both classes
            raise PipelineError(
                f"data: {name}: the {split} split has only label {int(labels[0, 0])}; every split needs both normal (0) "
                "and pneumonia (1) images, use the official file or a copy in the same layout"
            )
        if len(images) != info.n_samples[split]:
            raise PipelineError(
                f"data: {name}: the {split} split has {len(images)} samples, PneumoniaMNIST has {info.n_samples[split]}; "
                "use the official file or a copy in the same layout"
            )


def origin_of(source: str, size: int = 28) -> Path:
    """Where `source` is read from: the download cache for "medmnist" (the file of that size), else the local path."""
    if source == "medmnist":
        return CACHE_DIR / official_filename(size)
    return Path(source).expanduser()


def is_current(source: str, raw_npz: Path, provenance: dict | None, size: int = 28) -> bool:
    """True when `raw_npz` already holds the content of `source` at `size` px, as recorded in its provenance.

    The download stage runs on every `dvc repro` (a local file can change at the same path) and rewrites
    nothing when this holds, so the stages after it see unchanged data and skip.
    """
    if not provenance or not raw_npz.is_file():
        return False
    if source == "medmnist":
        same_source = provenance.get("source") == "medmnist"
    else:
        same_source = provenance.get("source") == "local" and provenance.get("path") == source
    same_source = same_source and provenance.get("size", 28) == size
    try:
        return same_source and md5sum(origin_of(source, size)) == provenance.get("md5") == md5sum(raw_npz)
    except OSError:  # missing or unreadable: fetch says why
        return False


def fetch(source: str, raw_npz: Path, info: DatasetInfo) -> dict:
    """Put a validated PneumoniaMNIST file at `raw_npz`; return its provenance."""
    if source == "medmnist":
        origin = download(info)
        provenance = {"source": "medmnist", "url": info.url}
    else:
        origin = Path(source).expanduser()
        provenance = {"source": "local", "path": str(source)}
    arrays = load_npz(origin, info)
    md5 = md5sum(origin)
    provenance |= {"size": info.size, "md5": md5, "official_md5": info.md5, "license": info.license}
    if md5 != info.md5:
        provenance["warning"] = f"MD5 {md5} differs from the official {info.md5}"
    provenance["class_counts"] = {
        split: {info.labels[str(k)]: int((arrays[f"{split}_labels"] == k).sum()) for k in (0, 1)} for split in SPLITS
    }
    raw_npz.parent.mkdir(parents=True, exist_ok=True)
    from pneumonia.files import atomic_path

    with atomic_path(raw_npz) as tmp:
        shutil.copyfile(origin, tmp)
    return provenance


def resize_images(images: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Resize (N, H, W) uint8 grayscale images to (N, size, size) uint8, one channel."""
    from PIL import Image

    method = getattr(Image.Resampling, interpolation.upper())
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), method))
    return out


def load_split(resized_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Resized images (N, S, S, 1) uint8 and labels (N,) for one split."""
    path = Path(resized_dir) / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["images"][..., None], npz["labels"].reshape(-1).astype("int32")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"data: cannot read {path} ({exc}); rerun the resize stage (dvc repro resize)") from None
