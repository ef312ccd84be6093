"""Real DICOM files for the predict tests, written with pydicom: one 16-bit-allocated grayscale DX frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid


def write(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 16,
          syntax=ExplicitVRLittleEndian, **attributes) -> Path:
    """`stored` (rows, columns) as unsigned stored values; `attributes` are set on the dataset (WindowCenter=...).

    A compressed `syntax` gets fake encapsulated bytes (a JPEG 2000 start marker, then nothing decodable).
    """
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    for name, value in attributes.items():
        setattr(ds, name, value)
    if syntax.is_compressed:
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = stored.astype("<u2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)  # with the preamble and file meta, as devices write them
    return Path(path)
