"""``read_header``: the DICOM receiver's check of an uncompressed single-frame image without decoding
its pixels; everything else is left to the full decoder (None)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from oncoscope.imaging.dicom import read_dicom, read_header
from oncoscope.imaging.limits import ImageLoadError

from .test_dicom import make_dicom, to_bytes


def test_the_header_says_what_the_decoder_says():
    grey = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)
    data = to_bytes(make_dicom(grey, modality="MR", extra={"BodyPartExamined": "brain", "AccessionNumber": "A1"}))
    h, full = read_header(data), read_dicom(data)
    assert (h.width, h.height) == (64, 48) == (full.rgb.shape[1], full.rgb.shape[0])
    for k in ("patient_id", "study_uid", "sop_instance_uid", "modality", "body_part", "accession_number"):
        assert getattr(h.image, k) == getattr(full, k), k
    assert h.image.rgb is None and h.image.body_part == "BRAIN" and h.image.accession_number == "A1"


def test_truncated_pixels_and_non_images_are_refused_and_other_kinds_left_to_the_decoder():
    grey = np.zeros((48, 64), dtype=np.uint8)
    with pytest.raises(ImageLoadError, match="shorter than"):
        read_header(to_bytes(make_dicom(grey, pixel_data=b"\0" * 100)))
    with pytest.raises(ImageLoadError, match="no image"):
        read_header(to_bytes(make_dicom(None, modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.11")))
    assert read_header(to_bytes(make_dicom(np.zeros((3, 48, 64), np.uint8), frames=3))) is None
    rle = encapsulate([b"\0" * 64])
    assert read_header(to_bytes(make_dicom(grey, transfer_syntax=RLELossless, pixel_data=rle))) is None
    with pytest.raises(ImageLoadError, match="not a DICOM"):
        read_header(b"not dicom")
