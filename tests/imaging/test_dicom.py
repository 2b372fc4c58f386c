"""DICOM input: read_dicom and load_image on every photometric interpretation, refusals, and the
load_image integration. Every DICOM file here is generated in-test with pydicom; nothing is
downloaded. The helpers that make them (make_dicom, to_bytes, colour, ...) are shared by other tests.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (JPEG2000, ComputedRadiographyImageStorage, CTImageStorage, ExplicitVRLittleEndian,
                         JPEGBaseline8Bit, MRImageStorage, RLELossless, SecondaryCaptureImageStorage, generate_uid)

from oncoscope.imaging.dicom import read_dicom
from oncoscope.imaging.imageio import ImageLoadError, load_image

VL_MICROSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.2"
VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"



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


def test_what_the_file_says_it_shows():
    """Body part, slice plane, acquisition words and b-value: read for the analysed frame, and a
    malformed optional value is left out, never a refusal of the file."""
    px = np.full((32, 32), 90, np.uint8)
    d = read_dicom(to_bytes(make_dicom(px, modality="MR", extra={
        "BodyPartExamined": "head", "ImageOrientationPatient": [0, 1, 0, 0, 0, -1],
        "ImageType": ["DERIVED", "PRIMARY", "ADC"], "DiffusionBValue": 0})))
    assert (d.body_part, d.plane, d.b_value) == ("HEAD", "sagittal", 0.0)
    assert "ADC" in d.acquisition.split("\\") and d.acquisition.startswith("test MONOCHROME2")
    for bad in ([float("nan")] * 6, [0, 0, 0, 0, 0, 0], [1, 0, 0]):
        assert read_dicom(to_bytes(make_dicom(px, modality="MR", extra={"ImageOrientationPatient": bad}))).plane == ""
    plain = read_dicom(to_bytes(make_dicom(px)))
    assert (plain.body_part, plain.plane, plain.b_value) == ("", "", None)


def test_enhanced_mr_gives_the_b_value_and_plane_of_the_middle_frame():
    from pydicom.dataset import Dataset as DS
    from pydicom.sequence import Sequence

    frames = np.stack([np.full((16, 16), 40 * (i + 1), np.uint8) for i in range(3)])
    per_frame = []
    for b in (0, 1000, 0):
        item, diffusion, plane = DS(), DS(), DS()
        diffusion.DiffusionBValue = b
        plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        item.MRDiffusionSequence, item.PlaneOrientationSequence = Sequence([diffusion]), Sequence([plane])
        per_frame.append(item)
    ds = make_dicom(frames, frames=3, modality="MR", extra={"PerFrameFunctionalGroupsSequence": Sequence(per_frame)})
    d = read_dicom(to_bytes(ds))
    assert d.frame_index == 1 and d.b_value == 1000.0 and d.plane == "axial"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_pixel_spacing_is_read_and_checked():
    """Pixel Spacing (row, column mm), else the frame's functional groups, else Imager Pixel Spacing; anything
    but two finite numbers in (0, 10) mm is unknown (None), never a refusal of the file."""
    from pydicom.dataset import Dataset as DS
    from pydicom.sequence import Sequence

    px = np.full((32, 32), 90, np.uint8)

    def spacing(**extra):
        return read_dicom(to_bytes(make_dicom(px, modality="CR", extra=extra))).pixel_spacing

    assert spacing(PixelSpacing=[0.5, 0.25]) == (0.5, 0.25)
    assert spacing(ImagerPixelSpacing=["0.143", "0.143"]) == (0.143, 0.143)
    assert spacing(PixelSpacing=[0.2, 0.2], ImagerPixelSpacing=[0.3, 0.3]) == (0.2, 0.2)  # the corrected one first
    assert spacing() is None
    for bad in ([0, 0.5], [-0.5, 0.5], [0.5], [0.5, 0.5, 0.5], [12, 12], ["nan", "0.5"], ["inf", "0.5"]):
        assert spacing(PixelSpacing=bad) is None, bad
    assert spacing(PixelSpacing=[40, 40], ImagerPixelSpacing=[0.2, 0.2]) is None  # a wrong value is not replaced
    raw = to_bytes(make_dicom(px, extra={"PixelSpacing": ["0.25", "0.25"]}))  # text pydicom would not write
    for text in (b"abcd\\0.25", b"0.25\\1e99"):
        assert read_dicom(raw.replace(b"0.25\\0.25", text)).pixel_spacing is None, text
    # enhanced multi-frame: the shared functional groups' Pixel Measures
    measures, shared = DS(), DS()
    measures.PixelSpacing = [0.8, 0.9]
    shared.PixelMeasuresSequence = Sequence([measures])
    frames = np.stack([px] * 3)
    d = read_dicom(to_bytes(make_dicom(frames, frames=3, modality="MR",
                                       extra={"SharedFunctionalGroupsSequence": Sequence([shared])})))
    assert d.pixel_spacing == (0.8, 0.9)
    # kept on the metadata that LoadedImage carries
    loaded = load_image(to_bytes(make_dicom(px, modality="CR", extra={"PixelSpacing": [0.5, 0.5]})))
    assert loaded.dicom.pixel_spacing == (0.5, 0.5) and loaded.dicom.rgb is None
