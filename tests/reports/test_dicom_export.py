"""DICOM output: Comprehensive SR, SEG and Secondary Capture of signed cases, and the identifiers and
names they carry (including those read from uploads). DICOM sources are generated in-test with the
helpers of tests/imaging/test_dicom.py.
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
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from oncoscope.imaging.dicom import read_dicom
from oncoscope.reports import dicom_common
from oncoscope.reports.dicom_common import DicomExportError
from oncoscope.reports.dicom_seg import mask_to_seg, rgb_to_secondary_capture
from oncoscope.reports.dicom_sr import case_to_sr
from oncoscope.store import cases as case_store
from oncoscope.store.models import Analysis, Case, CaseImage, Patient, User
from tests.databases import migrated_sqlite
from tests.imaging.test_dicom import COMPREHENSIVE_SR, VL_MICROSCOPIC, VL_WSI, colour, gradient, make_dicom, to_bytes

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


# ----------------------------------------------------------------------------- SR export
@pytest.fixture(scope="module")
def signed_case(tmp_path_factory):
    with migrated_sqlite(tmp_path_factory.mktemp("dicom-sr")) as s:
        yield _signed_case(s)


def _signed_case(s) -> SimpleNamespace:
    """A case of two analysed fields, signed "Pre-B ALL" (version 1)."""
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
    return SimpleNamespace(session=s, case=case, user=user, labels=labels)


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
