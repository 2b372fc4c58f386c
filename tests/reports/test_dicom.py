"""DICOM input (read_dicom / load_image) and output (Comprehensive SR, SEG, Secondary Capture).

Every DICOM file here is generated in-test with pydicom; nothing is downloaded.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (JPEG2000, CTImageStorage, ComputedRadiographyImageStorage, ExplicitVRLittleEndian,
                         JPEGBaseline8Bit, MRImageStorage, RLELossless, SecondaryCaptureImageStorage, generate_uid)

from oncoscope.imaging.imageio import ImageLoadError, load_image
from oncoscope.imaging.dicom import read_dicom
from oncoscope.reports import dicom_common
from oncoscope.reports.dicom_common import DicomExportError
from oncoscope.reports.dicom_seg import mask_to_seg, rgb_to_secondary_capture
from oncoscope.reports.dicom_sr import case_to_sr

VL_MICROSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.2"
VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


# ----------------------------------------------------------------------------- helpers
def make_dicom(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", *, bits_allocated: int = 8,
               bits_stored: int | None = None, signed: bool = False, frames: int = 1, modality: str = "OT",
               sop_class: str = SecondaryCaptureImageStorage, transfer_syntax: str = ExplicitVRLittleEndian,
               pixel_data: bytes | None = None, rows: int | None = None, columns: int | None = None,
               extra: dict | None = None, patient_name: str = "Doe^Jane", patient_id: str = "MRN-DCM-1") -> Dataset:
    """A minimal valid Part-10 dataset. ``pixels``: (rows, cols[, 3]) or (frames, rows, cols[, 3]); None = no
    Image Pixel module (e.g. an SR). ``pixel_data`` overrides the encoded bytes (compressed / garbage)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19800203", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "1", ""
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.SeriesDescription = f"test {photometric}"
    ds.Manufacturer = "test"
    if pixels is not None or pixel_data is not None:
        samples = 3 if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") else 1
        if pixels is not None:
            shape = pixels.shape[1:] if frames > 1 else pixels.shape
            rows, columns = shape[0], shape[1]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = samples
        ds.PhotometricInterpretation = photometric
        if samples == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = bits_allocated
        ds.BitsStored = bits_stored or bits_allocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if pixel_data is None:
            pixel_data = np.ascontiguousarray(pixels).tobytes()
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB" if bits_allocated == 8 or meta.TransferSyntaxUID.is_compressed else "OW"
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    if ds.file_meta.TransferSyntaxUID.is_private:  # pydicom needs to be told how to encode the dataset
        ds.save_as(buf, enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def gradient(rows: int = 40, cols: int = 48, dtype=np.uint8, hi: int = 255) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return ((x * 7 + y * 3) % (hi + 1)).astype(dtype)


def colour(rows: int = 40, cols: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(rows // 8 + 1, cols // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:rows, :cols])  # smooth blocks


# ----------------------------------------------------------------------------- photometric interpretations
def test_monochrome2_8bit_is_taken_as_is_and_metadata_comes_back():
    px = gradient()
    ds = make_dicom(px, "MONOCHROME2", patient_name="Doe^Jane^Q^Dr", extra={"StudyDescription": "smear"})
    d = read_dicom(to_bytes(ds))
    assert d.rgb.shape == (40, 48, 3) and d.rgb.dtype == np.uint8
    assert np.array_equal(d.rgb[..., 0], px) and np.array_equal(d.rgb[..., 0], d.rgb[..., 2])
    assert d.patient_name == "Doe, Dr Jane Q"
    assert d.patient_id == "MRN-DCM-1" and d.birth_date == "1980-02-03" and d.sex == "F" and d.sex_word == "female"
    assert d.study_uid == ds.StudyInstanceUID and d.series_uid == ds.SeriesInstanceUID
    assert d.sop_instance_uid == ds.SOPInstanceUID and d.modality == "OT"
    assert d.photometric == "MONOCHROME2" and d.frame_count == 1 and d.description == "test MONOCHROME2"


def test_monochrome1_is_inverted():
    px = gradient()
    d = read_dicom(to_bytes(make_dicom(px, "MONOCHROME1")))
    assert np.array_equal(d.rgb[..., 1], 255 - px)


def test_monochrome2_16bit_window_maps_to_full_range():
    px = (np.arange(40 * 48).reshape(40, 48) * 2).astype(np.uint16)  # 0..3838: 12 bits stored in 16
    px[0, :4] = [0, 999, 1000, 4095]
    ds = make_dicom(px, "MONOCHROME2", bits_allocated=16, bits_stored=12,
                    extra={"WindowCenter": "1500", "WindowWidth": "1001"})
    d = read_dicom(to_bytes(ds))
    g = d.rgb[..., 0].astype(int)
    lo, hi = 1500 - 500, 1500 + 500  # LINEAR window: [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2]
    assert np.all(g[px <= lo - 1] == 0) and np.all(g[px >= hi] == 255)
    inside = (px > lo) & (px < hi - 1)
    expected = np.clip(((px[inside] - 1499.5) / 1000.0 + 0.5) * 255.0, 0, 255)
    assert np.abs(g[inside] - expected).max() <= 1
    assert d.window == (1500.0, 1001.0)
    assert g.min() == 0 and g.max() == 255


def test_monochrome2_16bit_without_window_is_stretched():
    px = (gradient(hi=255).astype(np.uint16) * 10 + 3000)
    d = read_dicom(to_bytes(make_dicom(px, "MONOCHROME2", bits_allocated=16, bits_stored=16)))
    assert d.window is None and d.rgb.min() == 0 and d.rgb.max() == 255
    assert np.corrcoef(d.rgb[..., 0].ravel().astype(float), px.ravel().astype(float))[0, 1] > 0.99


def test_signed_16bit_with_rescale_and_window():
    hu = gradient(hi=255).astype(np.int16) * 8 - 1024  # stored values, slope 1 / intercept 0 in CT -> use a real one
    stored = ((hu + 1024) // 2).astype(np.int16) - 600  # negative stored values; HU = stored * 2 - 1024 + 1200
    ds = make_dicom(stored, "MONOCHROME2", bits_allocated=16, bits_stored=16, signed=True, modality="CT",
                    sop_class=CTImageStorage,
                    extra={"RescaleSlope": "2", "RescaleIntercept": "176", "WindowCenter": "40", "WindowWidth": "400"})
    assert stored.min() < 0
    d = read_dicom(to_bytes(ds))
    real = stored.astype(float) * 2 + 176
    g = d.rgb[..., 0]
    assert np.all(g[real <= 40 - 200.5] == 0) and np.all(g[real >= 40 + 200] == 255)
    mid = np.abs(real - 40) < 1
    assert mid.any() and np.all(np.abs(g[mid].astype(int) - 128) <= 2)
    assert d.modality == "CT"


def test_rgb_8bit_exact_pixels():
    px = colour()
    d = read_dicom(to_bytes(make_dicom(px, "RGB", sop_class=VL_MICROSCOPIC, modality="SM")))
    assert np.array_equal(d.rgb, px) and d.photometric == "RGB" and d.modality == "SM"


def test_rgb_planar_configuration_1():
    px = colour(seed=3)
    ds = make_dicom(px, "RGB", pixel_data=np.ascontiguousarray(px.transpose(2, 0, 1)).tobytes(), rows=40, columns=48)
    ds.PlanarConfiguration = 1
    assert np.array_equal(read_dicom(to_bytes(ds)).rgb, px)


def test_ybr_full_is_converted_to_rgb():
    px = colour(seed=1)
    ybr = convert_color_space(px, "RGB", "YBR_FULL")
    d = read_dicom(to_bytes(make_dicom(ybr, "YBR_FULL")))
    assert d.photometric == "YBR_FULL"
    assert np.abs(d.rgb.astype(int) - px.astype(int)).max() <= 2  # rounding of the two conversions


def test_ybr_full_422_native_is_converted_and_upsampled():
    px = colour(seed=2)  # 8x8 blocks: chroma subsampling loses nothing
    ybr = convert_color_space(px, "RGB", "YBR_FULL")
    # native YBR_FULL_422: Y0 Y1 Cb Cr per pair of pixels
    pairs = ybr.reshape(40, 24, 2, 3)
    packed = np.stack([pairs[:, :, 0, 0], pairs[:, :, 1, 0], pairs[:, :, 0, 1], pairs[:, :, 0, 2]], axis=-1)
    ds = make_dicom(None, "YBR_FULL_422", pixel_data=packed.tobytes(), rows=40, columns=48)
    d = read_dicom(to_bytes(ds))
    assert np.abs(d.rgb.astype(int) - px.astype(int)).max() <= 2


def test_jpeg_baseline_ybr_full_422_is_decoded_once():
    """The decoder already returns RGB for JPEG: no second colour conversion."""
    px = colour(seed=4, rows=64, cols=64)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=95, subsampling=0)
    ds = make_dicom(None, "YBR_FULL_422", transfer_syntax=JPEGBaseline8Bit, rows=64, columns=64,
                    pixel_data=encapsulate([buf.getvalue()]))
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    d = read_dicom(to_bytes(ds))
    assert np.abs(d.rgb.astype(int) - px.astype(int)).mean() < 4


def test_rle_lossless_rgb_exact():
    px = colour(seed=5)
    ds = make_dicom(px, "RGB")
    ds.compress(RLELossless, encoding_plugin="pydicom")
    d = read_dicom(to_bytes(ds))
    assert np.array_equal(d.rgb, px) and d.transfer_syntax == RLELossless


def test_palette_color_lut_is_applied():
    idx = (gradient() % 4).astype(np.uint8)
    lut = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 0], [10, 20, 250]], dtype=np.uint16)
    table = np.zeros((256, 3), dtype=np.uint16)
    table[:4] = lut
    extra = {"RedPaletteColorLookupTableDescriptor": [256, 0, 16],
             "GreenPaletteColorLookupTableDescriptor": [256, 0, 16],
             "BluePaletteColorLookupTableDescriptor": [256, 0, 16],
             "RedPaletteColorLookupTableData": (table[:, 0] * 257).astype("<u2").tobytes(),
             "GreenPaletteColorLookupTableData": (table[:, 1] * 257).astype("<u2").tobytes(),
             "BluePaletteColorLookupTableData": (table[:, 2] * 257).astype("<u2").tobytes()}
    d = read_dicom(to_bytes(make_dicom(idx, "PALETTE COLOR", extra=extra)))
    assert np.array_equal(d.rgb, lut[idx].astype(np.uint8))


def test_multiframe_mr_uses_middle_frame():
    frames = np.zeros((5, 32, 40), dtype=np.uint16)
    for k in range(5):  # frame k: a bright block at columns 8k..8k+7
        frames[k, 8:24, 8 * k:8 * k + 8] = 1000 + k
    ds = make_dicom(frames, "MONOCHROME2", bits_allocated=16, bits_stored=16, frames=5, modality="MR",
                    sop_class=MRImageStorage)
    d = read_dicom(to_bytes(ds))
    assert d.frame_count == 5 and d.frame_index == 2 and d.modality == "MR"
    bright = d.rgb[..., 0] > 128
    assert np.array_equal(bright, frames[2] > 0)


def test_multiframe_microscopy_uses_first_frame():
    frames = np.stack([colour(seed=k) for k in range(3)])
    d = read_dicom(to_bytes(make_dicom(frames, "RGB", frames=3, modality="SM", sop_class=VL_MICROSCOPIC)))
    assert d.frame_index == 0 and np.array_equal(d.rgb, frames[0])


def test_tiled_full_whole_slide_is_stitched():
    full = colour(rows=50, cols=60, seed=9)
    padded = np.zeros((64, 64, 3), dtype=np.uint8)
    padded[:50, :60] = full
    tiles = np.stack([padded[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)])
    ds = make_dicom(tiles, "RGB", frames=4, modality="SM", sop_class=VL_WSI,
                    extra={"DimensionOrganizationType": "TILED_FULL", "TotalPixelMatrixRows": 50,
                           "TotalPixelMatrixColumns": 60})
    d = read_dicom(to_bytes(ds))
    assert d.frame_index is None and np.array_equal(d.rgb, full)


def test_voi_lut_sequence_is_applied():
    px = gradient()
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.add_new("LUTData", "US", list(range(255, -1, -1)))  # an inverting VOI LUT
    d = read_dicom(to_bytes(make_dicom(px, "MONOCHROME2", extra={"VOILUTSequence": [lut]})))
    assert np.array_equal(d.rgb[..., 0], 255 - px)


def test_cr_monochrome1_with_window():
    px = (np.arange(40 * 48).reshape(40, 48) % 1024).astype(np.uint16)
    ds = make_dicom(px, "MONOCHROME1", bits_allocated=16, bits_stored=10, modality="CR",
                    sop_class=ComputedRadiographyImageStorage, extra={"WindowCenter": "512", "WindowWidth": "1024"})
    d = read_dicom(to_bytes(ds))
    assert d.modality == "CR"
    g = d.rgb[..., 0].astype(int)
    assert g[px == 0].min() == 255 and g[px == 1023].max() <= 1  # inverted after windowing


# ----------------------------------------------------------------------------- refusals
def test_not_dicom():
    with pytest.raises(ImageLoadError, match="not a DICOM file"):
        read_dicom(b"\x89PNG\r\n\x1a\n" + b"0" * 200)


def test_no_pixel_data_is_refused():
    sr = make_dicom(None, sop_class=COMPREHENSIVE_SR, modality="SR")
    with pytest.raises(ImageLoadError, match="contains no image .it is a Comprehensive SR object"):
        read_dicom(to_bytes(sr))


def test_random_bytes_with_dicm_magic():
    data = b"\0" * 128 + b"DICM" + np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageLoadError):
        read_dicom(data)
    with pytest.raises(ImageLoadError):
        load_image(data)


def test_truncated_pixel_data():
    good = to_bytes(make_dicom(colour(), "RGB"))
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        read_dicom(good[:-2000])


def test_garbage_jpeg2000_names_the_transfer_syntax():
    ds = make_dicom(None, "MONOCHROME2", transfer_syntax=JPEG2000, rows=64, columns=64,
                    pixel_data=encapsulate([b"\xff\x4f\xff\x51" + b"garbage" * 50]))
    with pytest.raises(ImageLoadError, match=r"JPEG 2000.*1\.2\.840\.10008\.1\.2\.4\.91"):
        read_dicom(to_bytes(ds))


def test_unknown_transfer_syntax():
    ds = make_dicom(None, "MONOCHROME2", transfer_syntax="1.2.3.4.5.6", rows=64, columns=64,
                    pixel_data=encapsulate([b"\0" * 100]))
    with pytest.raises(ImageLoadError, match=r"1\.2\.3\.4\.5\.6"):
        read_dicom(to_bytes(ds))


def test_huge_dimensions_refused_before_decoding(monkeypatch):
    ds = make_dicom(None, "MONOCHROME2", rows=20000, columns=20000, pixel_data=b"\0" * 64)

    def boom(*a, **k):  # decoding must not even start
        raise AssertionError("decoder called")

    monkeypatch.setattr("pydicom.pixels.get_decoder", boom)
    with pytest.raises(ImageLoadError, match="20000x20000 pixels; the limit is 64 megapixels"):
        read_dicom(to_bytes(ds))
    with pytest.raises(ImageLoadError, match="megapixels"):
        load_image(to_bytes(ds))


def test_too_small_refused():
    with pytest.raises(ImageLoadError, match="at least 16x16"):
        read_dicom(to_bytes(make_dicom(gradient(8, 8), "MONOCHROME2")))


# ----------------------------------------------------------------------------- load_image integration
def test_load_image_routes_dicom(tmp_path):
    px = colour(seed=7)
    data = to_bytes(make_dicom(px, "RGB", patient_id="P-77"))
    li = load_image(data)
    assert li.format == "DICOM" and li.original_mode == "RGB" and li.original_size == (48, 40)
    assert np.array_equal(li.rgb, px)
    assert li.dicom.patient_id == "P-77" and li.dicom.rgb is None
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    assert load_image(path).dicom.patient_id == "P-77"
    with open(path, "rb") as fh:
        assert load_image(fh).format == "DICOM"


def test_load_image_non_dicom_has_no_dicom_metadata():
    buf = io.BytesIO()
    Image.fromarray(colour()).save(buf, "PNG")
    assert load_image(buf.getvalue()).dicom is None


# ----------------------------------------------------------------------------- SR export
@pytest.fixture(scope="module")
def signed_case(tmp_path_factory):
    from oncoscope.store import cases as case_store
    from oncoscope.store import migrate
    from oncoscope.store.db import make_engine, make_session_factory
    from oncoscope.store.models import Analysis, Case, CaseImage, Patient, User

    home = tmp_path_factory.mktemp("dicom-sr")
    url = f"sqlite:///{home / 'db.sqlite'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    s = make_session_factory(engine)()
    user = User(email="doc@clinic.test", name="Dr Sara Ahmadi", role="doctor", password_hash="x")
    patient = Patient(mrn="MRN-SR-1", family_name="Doe", given_name="Jane", birth_date=dt.date(1980, 2, 3),
                      sex="female")
    s.add_all([user, patient])
    s.flush()
    case = Case(patient_id=patient.id, analyzer_id="smear-all", created_by_id=user.id, status="ready",
                created_at=dt.datetime(2026, 1, 2, 9, 30))
    s.add(case)
    s.flush()
    for n, (label, probs, cells) in enumerate([("Pre", {"Benign": 0.05, "Early": 0.1, "Pre": 0.8, "Pro": 0.05}, 12),
                                               ("Pre", {"Benign": 0.1, "Early": 0.1, "Pre": 0.7, "Pro": 0.1}, 9)]):
        img = CaseImage(case_id=case.id, sha256=f"{n:064x}", original_filename=f"field{n}.png", width=64, height=64,
                        size_bytes=100)
        s.add(img)
        s.flush()
        s.add(Analysis(image_id=img.id, analyzer_id="smear-all", job_status="done", result_status="ok",
                       label=label, confidence=max(probs.values()), malignant=True, malignant_probability=0.95,
                       probabilities=probs, cell_count=cells, cells=[], messages=["ok"], model_version="1.0.0",
                       model_sha256="ab" * 32))
    s.flush()
    s.refresh(case)
    labels = ["Benign", "Early", "Pre", "Pro", "Nondiagnostic"]
    case_store.sign(s, case, user, "Pre", labels, comment="Confirm with flow cytometry.")
    s.commit()
    yield SimpleNamespace(session=s, case=case, user=user, labels=labels)
    s.close()
    engine.dispose()


ANALYZER = SimpleNamespace(display_names={"Benign": "Benign (hematogone)", "Early": "Early Pre-B ALL",
                                          "Pre": "Pre-B ALL", "Pro": "Pro-B ALL"},
                           name="Peripheral blood smear", version="1.0.0")


def _walk(items):
    for it in items:
        yield it
        yield from _walk(it.get("ContentSequence", []))


def _texts(ds) -> list[str]:
    out = []
    for it in _walk(ds.ContentSequence):
        if "TextValue" in it:
            out.append(str(it.TextValue))
        for code in it.get("ConceptCodeSequence", []):
            out.append(str(code.CodeMeaning))
    return out


def test_case_to_sr_round_trip(signed_case):
    data = case_to_sr(signed_case.case, ANALYZER)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == COMPREHENSIVE_SR and ds.file_meta.MediaStorageSOPClassUID == COMPREHENSIVE_SR
    assert ds.Modality == "SR" and ds.PatientID == "MRN-SR-1" and str(ds.PatientName) == "Doe^Jane"
    assert ds.PatientBirthDate == "19800203" and ds.PatientSex == "F"
    assert ds.StudyInstanceUID == dicom_common.case_study_uid(signed_case.case)
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "VERIFIED"
    assert ds.VerifyingObserverSequence[0].VerificationDateTime.startswith(
        signed_case.case.current_review.signed_at.strftime("%Y%m%d%H%M"))
    texts = _texts(ds)
    assert "Pre-B ALL" in texts  # final diagnosis (and the AI class per image)
    assert "Confirm with flow cytometry." in texts and "1.0.0" in texts and "smear-all" in texts
    assert "Yes" in texts  # agrees with the AI
    nums = {str(it.ConceptNameCodeSequence[0].CodeMeaning): float(it.MeasuredValueSequence[0].NumericValue)
            for it in _walk(ds.ContentSequence) if it.ValueType == "NUM"}
    assert nums["Probability of Pre-B ALL"] == pytest.approx(0.7)  # last field wins in this dict
    assert nums["White blood cell count"] in (12, 9)
    final = [it for it in _walk(ds.ContentSequence)
             if it.ConceptNameCodeSequence[0].get("CodeValue") == "22637-3"][0]
    assert final.ConceptCodeSequence[0].CodeValue == "Pre"
    # highdicom can parse it back, and the export is deterministic
    import highdicom as hd

    assert hd.sr.ComprehensiveSR.from_dataset(ds) is not None
    assert case_to_sr(signed_case.case, ANALYZER) == data


def test_case_to_sr_reuses_dicom_study_uid_and_lists_predecessors(signed_case):
    from oncoscope.store import cases as case_store

    case = signed_case.case
    first = pydicom.dcmread(io.BytesIO(case_to_sr(case, None, study_uid="1.2.3.4.5")))
    assert first.StudyInstanceUID == "1.2.3.4.5"
    case_store.sign(signed_case.session, case, signed_case.user, "Pro", signed_case.labels,
                    override_reason="Blast morphology", amendment_reason="Second read")
    second = pydicom.dcmread(io.BytesIO(case_to_sr(case, ANALYZER, study_uid="1.2.3.4.5")))
    assert second.SOPInstanceUID != first.SOPInstanceUID and second.InstanceNumber == 2
    pred = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == first.SOPInstanceUID
    texts = _texts(second)
    assert "Pro-B ALL" in texts and "No" in texts and "Blast morphology" in texts and "Second read" in texts


def test_case_to_sr_refuses_unsigned_case():
    case = SimpleNamespace(current_review=None)
    with pytest.raises(DicomExportError, match="not signed"):
        case_to_sr(case)


# ----------------------------------------------------------------------------- SEG export
def _seg_mask(seg_bytes: bytes) -> np.ndarray:
    import highdicom as hd

    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.SegmentSequence[0].SegmentLabel == "White blood cell"
    src_uids = [u[2] for u in seg.get_source_image_uids()]
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=src_uids[:1], segment_numbers=[1])
    return np.asarray(arr)[0, :, :, 0], src_uids


def _mask(rows=40, cols=48) -> np.ndarray:
    m = np.zeros((rows, cols), dtype=np.int32)
    m[5:15, 6:20] = 1
    m[20:35, 25:40] = 2
    return m


def test_mask_to_seg_for_dicom_source():
    src = make_dicom(colour(), "RGB", sop_class=VL_MICROSCOPIC, modality="SM")
    when = dt.datetime(2026, 1, 2, 10, 0)
    data = mask_to_seg(to_bytes(src), _mask(), model_id="smear-all", model_version="1.0.0", created_at=when)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    got, src_uids = _seg_mask(data)
    assert src_uids == [src.SOPInstanceUID]
    assert np.array_equal(got.astype(bool), _mask() > 0)
    again = mask_to_seg(src, _mask(), model_id="smear-all", model_version="1.0.0", created_at=when)
    assert again == data  # a Dataset source gives the same, reproducible bytes


def test_mask_to_seg_for_png_source_wraps_a_secondary_capture(signed_case):
    rgb = colour(seed=11)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    data = mask_to_seg(buf.getvalue(), _mask(), case=signed_case.case)
    got, src_uids = _seg_mask(data)
    assert np.array_equal(got.astype(bool), _mask() > 0)
    sc = rgb_to_secondary_capture(rgb, case=signed_case.case)  # deterministic: the referenced SC
    assert src_uids == [sc.SOPInstanceUID]
    assert sc.PatientID == "MRN-SR-1" and sc.StudyInstanceUID == dicom_common.case_study_uid(signed_case.case)
    sc_back = read_dicom(to_bytes(sc))
    assert np.array_equal(sc_back.rgb, rgb)


def test_mask_to_seg_upscales_a_downscaled_mask_and_rejects_mismatch():
    rgb = colour(rows=40, cols=48)
    small = _mask()[::2, ::2]
    got, _ = _seg_mask(mask_to_seg(rgb, small))
    assert got.shape == (40, 48) and got.sum() > 0
    with pytest.raises(ValueError, match="mask is"):
        mask_to_seg(rgb, np.zeros((40, 10)))


def test_mask_to_seg_for_mr_source_with_geometry():
    src = make_dicom(gradient(40, 48, np.uint16, 1000), "MONOCHROME2", bits_allocated=16, modality="MR",
                     sop_class=MRImageStorage,
                     extra={"FrameOfReferenceUID": generate_uid(), "ImagePositionPatient": [0, 0, 0],
                            "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "PixelSpacing": [0.5, 0.5],
                            "SliceThickness": 3.0})
    got, _ = _seg_mask(mask_to_seg(src, _mask()))
    assert np.array_equal(got.astype(bool), _mask() > 0)


def test_mask_to_seg_for_tiled_whole_slide_source():
    import highdicom as hd

    full = colour(rows=50, cols=60, seed=9)
    padded = np.zeros((64, 64, 3), dtype=np.uint8)
    padded[:50, :60] = full
    tiles = np.stack([padded[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)])
    measures, origin = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.0005, 0.0005], 0.001
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    src = make_dicom(tiles, "RGB", frames=4, modality="SM", sop_class=VL_WSI, extra={
        "DimensionOrganizationType": "TILED_FULL", "TotalPixelMatrixRows": 50, "TotalPixelMatrixColumns": 60,
        "FrameOfReferenceUID": generate_uid(), "ImageOrientationSlide": [0, -1, 0, -1, 0, 0],
        "TotalPixelMatrixOriginSequence": [origin], "SharedFunctionalGroupsSequence": [shared],
        "ImageType": ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], "TotalPixelMatrixFocalPlanes": 1,
        "NumberOfOpticalPaths": 1, "ContainerIdentifier": "SLIDE-1"})
    assert np.array_equal(read_dicom(to_bytes(src)).rgb, full)  # the image the mask was computed on
    mask = np.zeros((50, 60), dtype=np.int32)
    mask[10:40, 5:55] = 3
    seg = hd.seg.segread(io.BytesIO(mask_to_seg(to_bytes(src), mask)))
    got = seg.get_total_pixel_matrix(segment_numbers=[1])[..., 0]
    assert np.array_equal(got.astype(bool), mask > 0)


def test_secondary_capture_without_case_is_deterministic_and_readable():
    rgb = colour(seed=12)
    a = rgb_to_secondary_capture(rgb, patient_id="P-9", patient_name="Jane Doe", sex="F")
    b = rgb_to_secondary_capture(rgb, patient_id="P-9", patient_name="Jane Doe", sex="F")
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID
    d = read_dicom(dicom_common.to_part10(a))
    assert np.array_equal(d.rgb, rgb) and d.patient_id == "P-9" and d.patient_name == "Jane Doe" and d.sex == "F"


# ----------------------------------------------------------------------------- identifiers and names in exports
def _hostile_case(signed_case, mrn: str, family: str, given: str):
    """A signed case of a patient row as old versions could store it (the ORM, no input validation)."""
    from oncoscope.store import cases as case_store
    from oncoscope.store.models import Analysis, Case, CaseImage, Patient

    made = vars(signed_case).setdefault("hostile", {})  # the database lives as long as the module
    if mrn in made:
        return made[mrn]
    s = signed_case.session
    patient = Patient(mrn=mrn, family_name=family, given_name=given, sex="male")
    s.add(patient)
    s.flush()
    case = Case(patient_id=patient.id, analyzer_id="smear-all", created_by_id=signed_case.user.id, status="ready",
                created_at=dt.datetime(2026, 1, 3, 9, 0))
    s.add(case)
    s.flush()
    img = CaseImage(case_id=case.id, sha256=f"{patient.id:064x}", original_filename="a\\b\x07.png", width=64,
                    height=64, size_bytes=100)
    s.add(img)
    s.flush()
    s.add(Analysis(image_id=img.id, analyzer_id="smear-all", job_status="done", result_status="ok", label="Pre",
                   confidence=0.8, malignant=True, malignant_probability=0.9, probabilities={"Pre": 0.8},
                   cell_count=3, cells=[], messages=["line\x01one"], model_version="1.0.0", model_sha256="ab" * 32))
    s.flush()
    s.refresh(case)
    case_store.sign(s, case, signed_case.user, "Pre", signed_case.labels, comment="C:\\path\x1b\ttab\nline 2")
    s.commit()
    made[mrn] = case
    return case


# (MRN, family, given) as stored -> (Patient ID, family, given) exported
HOSTILE_PATIENTS = [
    (("B-001\\ZZ", "Doe", "Jane"), ("B-001%5CZZ", "Doe", "Jane")),  # was two Patient IDs: B-001 and ZZ
    (("EQ-1", "Doe=Smith", "Jane"), ("EQ-1", "Doe Smith", "Jane")),  # was an ideographic group "Smith^Jane"
    (("BS-1", "O\\Brien", "Ja^ne\r\n"), ("BS-1", "O Brien", "Ja ne")),  # was a 500 (TypeError in highdicom)
    (("PC-100%", "Doe", "\x00"), ("PC-100%25", "Doe", "")),
]


def _assert_patient_module(ds, want):
    want_id, family, given = want
    assert ds["PatientID"].VM == 1 and ds.PatientID == want_id
    assert ds["PatientName"].VM == 1
    pn = ds.PatientName
    assert pn.components == (str(pn),)  # the alphabetic group only: no ideographic / phonetic group
    assert (pn.family_name, pn.given_name) == (family, given)


@pytest.mark.parametrize("stored,want", HOSTILE_PATIENTS)
def test_sr_patient_module_of_hostile_identifiers(signed_case, stored, want):
    case = _hostile_case(signed_case, *stored)
    ds = pydicom.dcmread(io.BytesIO(case_to_sr(case, ANALYZER)))
    _assert_patient_module(ds, want)
    assert ds.PatientID == dicom_common.dicom_value(stored[0], "LO")
    texts = _texts(ds)
    assert "C:\\path tab\nline 2" in texts  # free text (UT) keeps its backslash and line break
    assert "Field 1: a\\b.png" in texts and "lineone" in texts
    import highdicom as hd

    assert hd.sr.ComprehensiveSR.from_dataset(ds) is not None


@pytest.mark.parametrize("stored,want", HOSTILE_PATIENTS)
def test_seg_and_secondary_capture_patient_module_of_hostile_identifiers(signed_case, stored, want):
    case = _hostile_case(signed_case, *stored)
    rgb = colour(seed=5)
    seg = pydicom.dcmread(io.BytesIO(mask_to_seg(rgb, _mask(), case=case, segment_label="cell\\s")))
    _assert_patient_module(seg, want)
    assert seg.SegmentSequence[0]["SegmentLabel"].VM == 1 and seg.SegmentSequence[0].SegmentLabel == "cell%5Cs"
    _assert_patient_module(rgb_to_secondary_capture(rgb, case=case), want)


def test_sr_signer_name_cannot_open_another_component_group(signed_case):
    case = _hostile_case(signed_case, "SIGNER-1", "Doe", "Jane")
    signer = case.current_review.signed_by
    old = signer.name
    signer.name = "Dr=Evil^Doc\\tor"
    try:
        ds = pydicom.dcmread(io.BytesIO(case_to_sr(case, ANALYZER)))
    finally:
        signer.name = old
    observer = ds.VerifyingObserverSequence[0].VerifyingObserverName
    assert observer.components == ("Dr Evil Doc tor^",) and observer.family_name == "Dr Evil Doc tor"
    names = [it.PersonName for it in _walk(ds.ContentSequence) if it.ValueType == "PNAME"]
    assert names and all(str(n) == "Dr Evil Doc tor^" for n in names)


def test_dicom_value_rules():
    v = dicom_common.dicom_value
    assert v("B-001\\ZZ") == "B-001%5CZZ" and v("50%") == "50%25" and v("a\nb\x7f") == "a%0Ab%7F"
    assert v("B-001/ZZ") != v("B-001\\ZZ")  # reversible: distinct identifiers stay distinct
    assert v("\ud800") == "%ED%A0%80" and v(None) == "" and v(12) == "12"
    assert v("x" * 63 + "\\") == "x" * 63  # cut to 64 characters, never inside an escape
    assert v("abcdefghijklmno\\", "SH") == "abcdefghijklmno" and len(v("y" * 100, "LO")) == 64
    assert v(("Doe", "Jane"), "PN") == "Doe^Jane" and v("Jane Doe", "PN") == "Jane Doe^"
    assert v(("Doe=Smith", "Ja\\ne", "", "", ""), "PN") == "Doe Smith^Ja ne"
    assert v(("", "Jane"), "PN") == "^Jane" and v(("", ""), "PN") == "" and v(None, "PN") == ""
    assert v(("  Van   der\tBerg ", None), "PN") == "Van der Berg^"
    assert v("a\\b\r\n\x0cc\td\x00\x1b", "UT") == "a\\b\r\n\x0cc d" and len(v("z" * 2000, "ST")) == 1024
    with pytest.raises(KeyError):
        v("x", "DS")


# ----------------------------------------------------------------------------- identifiers read from uploads
@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_multi_valued_identifiers_are_read_as_dicom_values_not_python_lists():
    ds = make_dicom(gradient(), patient_id="B-001\\ZZ", patient_name="Doe^Jane\\Roe^Z",
                    extra={"StudyInstanceUID": ["1.2.3", "1.2.4"], "SeriesInstanceUID": ["1.2.5", "1.2.6"],
                           "PatientBirthDate": ["19800203", "19900101"]})
    d = read_dicom(to_bytes(ds))
    assert d.patient_id == "B-001\\ZZ"  # was "['B-001', 'ZZ']"; the MRN rule refuses it with its own message
    assert d.patient_name == "Doe, Jane"  # the first value, was "['Doe^Jane', 'Roe^Z']"
    assert d.study_uid is None and d.series_uid is None  # were "['1.2.3', '1.2.4']", written back into the SR
    assert d.birth_date is None and d.sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length")
@pytest.mark.parametrize("uid,kept", [
    ("1.2.840.10008.0.5", True), ("0.1.0", True), ("1.2.3\x00", True), ("1." + "2" * 62, True),
    ("1.02.3", False), ("1.2.3.", False), (".1.2", False), ("1..2", False), ("1.2.a", False), ("1.2 .3", False),
    ("1." + "2" * 63, False), ("", False)])
def test_uids_read_from_a_file_are_kept_only_when_valid(uid, kept):
    d = read_dicom(to_bytes(make_dicom(gradient(), extra={"StudyInstanceUID": uid})))
    assert d.study_uid == (uid.rstrip("\x00") if kept else None)


def test_dicom_value_ui_accepts_one_valid_uid_and_refuses_anything_else():
    v = dicom_common.dicom_value
    assert v("1.2.840.10008.5.1.4.1.1.88.33", "UI") == "1.2.840.10008.5.1.4.1.1.88.33" and v("0", "UI") == "0"
    for bad in ("", None, "1.02", "1.2.", "1.2\n", "1.2.3\\1.2.4", "['1.2.3', '1.2.4']", ["1.2.3"], "1." + "1" * 63,
                "\u0661.\u0662", "1.2.3%5C1"):
        with pytest.raises(DicomExportError, match="Not a valid DICOM UID"):
            v(bad, "UI")


def test_sr_refuses_a_study_uid_that_is_not_one_uid(signed_case):
    with pytest.raises(DicomExportError, match="Not a valid DICOM UID"):  # was written, pydicom only warned
        case_to_sr(signed_case.case, ANALYZER, study_uid="['1.2.3', '1.2.4']")


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_seg_refuses_a_dicom_source_whose_uids_it_would_copy_are_not_valid():
    src = make_dicom(colour(), "RGB", extra={"StudyInstanceUID": ["1.2.3", "1.2.4"]})
    with pytest.raises(DicomExportError, match="StudyInstanceUID is not a valid DICOM UID"):
        mask_to_seg(to_bytes(src), _mask())


UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1


def _invalid_uids(ds) -> list:
    values = [v for e in ds.iterall() if e.VR == "UI" for v in (e.value if e.VM > 1 else [e.value])]
    assert values
    return [v for v in values if not (len(v) <= 64 and UID.fullmatch(v))]


def test_every_uid_the_writers_set_is_valid(signed_case):
    sr = pydicom.dcmread(io.BytesIO(case_to_sr(signed_case.case, ANALYZER)))
    sc = rgb_to_secondary_capture(colour(seed=3), case=signed_case.case)
    seg = pydicom.dcmread(io.BytesIO(mask_to_seg(colour(seed=3), _mask(), case=signed_case.case)))
    for ds in (sr, sc, seg):
        assert _invalid_uids(ds) == [] and _invalid_uids(ds.file_meta) == []


def test_a_study_uid_stored_before_uids_were_checked_is_not_reused(signed_case):
    """Rows written by an earlier version may hold a list's text as the study UID: the SR then makes
    its own UID instead of failing (or copying the text)."""
    from oncoscope.store.cases import dicom_study_uid

    case = signed_case.case
    try:
        for img in case.images:
            img.dicom_study_uid = "['1.2.3', '1.2.4']"
        assert dicom_study_uid(case) is None
        ds = pydicom.dcmread(io.BytesIO(case_to_sr(case, ANALYZER, study_uid=dicom_study_uid(case))))
        assert "[" not in ds.StudyInstanceUID and ds.StudyInstanceUID.startswith(("1", "2"))
    finally:
        signed_case.session.rollback()
