"""predict.read_gray on real DICOM files: the grayscale pipeline (modality LUT, window, polarity) and its errors."""
import numpy as np
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

import dicom_files
from pneumonia import predict


def _anatomy(size=64, seed=0):
    """uint8 'anatomy' with 0 and 255 each on over 0.5 % of its pixels, so its 0.5th, 99.5th percentiles are 0, 255."""
    anatomy = np.random.default_rng(seed).integers(0, 256, (size, size)).astype(np.uint8)
    anatomy[:2], anatomy[-2:] = 0, 255
    return anatomy


def _stored(anatomy):
    return 1000 + 10 * anatomy.astype(np.uint16)  # 1000..3550: 12-bit stored values, not starting at 0


def _linear_window(values, center, width):
    """The DICOM LINEAR window function (PS3.3 C.11.2.1.2.1) onto 0..255."""
    return np.round(np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255)


def test_monochrome2_without_window_maps_its_percentiles_onto_0_255(tmp_path):
    anatomy = _anatomy()
    gray = predict.read_gray(dicom_files.write(tmp_path / "m2.dcm", _stored(anatomy), bits_stored=12))
    assert gray.dtype == np.uint8
    np.testing.assert_array_equal(gray, anatomy)


@pytest.mark.parametrize("photometric, shape", [("MONOCHROME1", None), ("MONOCHROME1", "INVERSE"),
                                                ("MONOCHROME2", "INVERSE")])
def test_inverted_polarity_gives_the_same_image(photometric, shape, tmp_path):
    """The same anatomy stored inverted (high values dark) reads as the same image; MONOCHROME1 with Presentation LUT
    Shape INVERSE, as the standard has MONOCHROME1 files say, is inverted once, not twice."""
    anatomy = _anatomy()
    extra = {"PresentationLUTShape": shape} if shape else {}
    path = dicom_files.write(tmp_path / "inverted.dcm", 4095 - _stored(anatomy), photometric, bits_stored=12, **extra)
    np.testing.assert_array_equal(predict.read_gray(path), anatomy)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_window_is_applied_and_values_outside_it_clip(photometric, tmp_path):
    """WindowCenter/WindowWidth set the range, not the data; MONOCHROME1 is inverted after the window (its window is
    on its own stored values: the mirror of MONOCHROME2's)."""
    stored = _stored(_anatomy()).astype("float64")
    center, width = 2276, 1001  # values 1775.5..2775.5 of 1000..3550
    if photometric == "MONOCHROME2":
        path = dicom_files.write(tmp_path / "w.dcm", stored, bits_stored=12, WindowCenter=center, WindowWidth=width)
    else:
        path = dicom_files.write(tmp_path / "w.dcm", 4095 - stored, photometric, bits_stored=12,
                                 WindowCenter=4096 - center, WindowWidth=width)
    gray = predict.read_gray(path)
    np.testing.assert_allclose(gray, _linear_window(stored, center, width), atol=1)  # 1: rounding of exact halves
    assert np.all(gray[stored <= 1775] == 0) and np.all(gray[stored >= 2776] == 255)
    assert (stored <= 1775).sum() > 1000 and (stored >= 2776).sum() > 1000  # both sides clip for real


def test_twelve_bit_stored_rescale_slope_intercept_then_window(tmp_path):
    """BitsStored 12 of 16 allocated (the unused high bits hold junk, as overlays once did), Rescale Slope/Intercept to
    modality values, and a window in those units."""
    anatomy = _anatomy()
    stored = _stored(anatomy)
    junk = stored.copy()
    junk[::2] |= 0xF000  # above bit 11: not part of the value
    path = dicom_files.write(tmp_path / "rescaled.dcm", junk, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                             WindowCenter=3000, WindowWidth=2001)
    modality = 2.0 * stored - 1024  # 976..6076
    gray = predict.read_gray(path)
    np.testing.assert_allclose(gray, _linear_window(modality, 3000, 2001), atol=1)
    assert np.all(gray[modality <= 1999] == 0) and np.all(gray[modality >= 4000] == 255)  # junk pixels included


def test_burned_in_text_does_not_set_the_contrast(tmp_path):
    """A bright burned-in label at the detector's maximum: clipped at the 99.5th percentile, it leaves the anatomy
    its full 0..255 (a min-max stretch would squeeze the anatomy into 0..210)."""
    anatomy = _anatomy(256)
    stored = _stored(anatomy)
    label = np.zeros(stored.shape, bool)
    label[10:22, 200:224] = True  # 288 pixels, 0.44 % of the image
    stored[label] = 4095
    gray = predict.read_gray(dicom_files.write(tmp_path / "label.dcm", stored, bits_stored=12))
    np.testing.assert_array_equal(gray[~label], anatomy[~label])
    assert np.all(gray[label] == 255)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless])
def test_undecodable_compressed_pixel_data_is_one_input_error_naming_the_fix(syntax, tmp_path):
    path = dicom_files.write(tmp_path / "compressed.dcm", _stored(_anatomy()), syntax=syntax)
    with pytest.raises(predict.InputError) as raised:
        predict.read_gray(path)
    message = str(raised.value)
    decoder = get_decoder(syntax)
    assert message.startswith(f"compressed transfer syntax {syntax.name} ({syntax}): ")
    # JPEG-LS: no decoder installed. JPEG 2000: Pillow decodes it, and fails on the fake bytes.
    assert ("decoding failed (" if decoder.is_available else "needs a decoder, and none is installed") in message
    assert all(name.split(" - ")[0] in message for name in decoder.missing_dependencies)
    assert message.endswith("convert the file to uncompressed (e.g. gdcmconv --raw IN OUT)") and "\n" not in message


def test_dicom_without_pixel_data_is_an_input_error(tmp_path):
    path = dicom_files.write(tmp_path / "no_pixels.dcm", _stored(_anatomy()))
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\xe0\x7f\x10\x00")])  # cut at the (7FE0,0010) Pixel Data tag
    with pytest.raises(predict.InputError, match=r"^not a readable DICOM file \(AttributeError: .*no 'Pixel Data'"):
        predict.read_gray(path)
