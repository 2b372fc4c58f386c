"""What a simulated doctor types (fast: no server)."""

from __future__ import annotations

import random

from oncoscope.bench.users import DEFAULT_MIX, FAMILIES, GIVEN, SimUser, diagnosis_fields, new_patient_fields

_OPTIONS = ('<option value="">Choose…</option><option value="Benign">'
            '<option selected value="Early"><option value="Pre"><option value="Nondiagnostic">')


def test_every_action_of_the_mix_is_a_method():
    for name in DEFAULT_MIX:
        assert callable(getattr(SimUser, f"act_{name}", None)), name


def test_the_doctor_mostly_agrees_with_the_ai_and_gives_a_reason_otherwise():
    rng = random.Random(0)
    chosen = [diagnosis_fields(_OPTIONS, rng) for _ in range(400)]
    agree = [f for f in chosen if f == {"final_diagnosis": "Early"}]
    override = [f for f in chosen if f["final_diagnosis"] != "Early"]
    assert len(agree) + len(override) == 400 and 300 < len(agree) < 400 and override
    assert all(f["final_diagnosis"] in ("Benign", "Pre", "Nondiagnostic") and f["override_reason"] for f in override)


def test_without_an_ai_label_the_case_is_signed_non_diagnostic_with_a_reason():
    no_ai = _OPTIONS.replace("selected ", "")
    f = diagnosis_fields(no_ai, random.Random(0))
    assert f["final_diagnosis"] == "Nondiagnostic" and f["override_reason"]


def test_new_patient_form_is_random_but_reproducible():
    a = new_patient_fields(random.Random(5), 3, "tok")
    b = new_patient_fields(random.Random(5), 3, "tok")
    assert {k: v for k, v in a.items() if k != "mrn"} == {k: v for k, v in b.items() if k != "mrn"}
    assert a["csrf_token"] == "tok" and a["mrn"].startswith("LD3-") and a["mrn"] != b["mrn"]
    assert a["family_name"] in FAMILIES and a["given_name"] in GIVEN
