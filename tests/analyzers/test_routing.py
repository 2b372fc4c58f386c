"""The DICOM routing table (``analyzers/routing``): rules parsed with clear errors, first match wins,
'-' matches a missing body part, and the default table follows the analyzers' configs."""

from __future__ import annotations

import pytest

from oncoscope.analyzers import routing

KNOWN = ["brain-mri", "bone-xray", "smear-differential"]


def test_rules_match_in_order_and_any_part_may_be_left_open():
    rules = routing.parse("MR/HEAD,BRAIN,-=brain-mri; CR,DX=bone-xray; */*/1.2.840.10008.5.1.4.1.1.77.1.6="
                          "smear-differential", KNOWN)
    assert routing.route(rules, "MR", "brain", "") == "brain-mri"
    assert routing.route(rules, "MR", "", "") == "brain-mri"  # not stated: '-'
    assert routing.route(rules, "MR", "KNEE", "") is None
    assert routing.route(rules, "dx", "HAND", "1.2.3") == "bone-xray"
    assert routing.route(rules, "SM", "", "1.2.840.10008.5.1.4.1.1.77.1.6") == "smear-differential"
    assert routing.route(rules, "CT", "CHEST", "1.2.840.10008.5.1.4.1.1.2") is None


@pytest.mark.parametrize("text,message", [("MR", "write MODALITIES"), ("MR=nope", "unknown analyzer"),
                                          ("=brain-mri", "write MODALITIES"), ("A/B/C/D=brain-mri", "write")])
def test_a_rule_that_cannot_be_read_is_named(text, message):
    with pytest.raises(routing.RouteError, match=message):
        routing.parse(text, KNOWN)


def test_the_default_table_comes_from_the_installed_analyzers():
    rules = {r.analyzer_id: r for r in routing.defaults()}
    assert rules["brain-mri"].modalities == frozenset({"MR"}) and "-" in rules["brain-mri"].body_parts
    assert rules["bone-xray"].modalities >= {"CR", "DX"}
    assert "smear-all" not in rules  # names no DICOM modality: receives nothing unless a rule says so
    assert routing.table("") == routing.defaults() and routing.table("CR=bone-xray")[0].analyzer_id == "bone-xray"


def test_a_study_is_offered_only_to_analyzers_that_read_its_modality_and_body_part():
    assert routing.can_read("brain-mri", "MR", "BRAIN") and routing.can_read("brain-mri", "mr", "")
    assert not routing.can_read("brain-mri", "MR", "KNEE")  # its analysis would refuse every slice
    assert not routing.can_read("brain-mri", "CT", "HEAD")
    assert routing.can_read("bone-xray", "CR", "KNEE")  # (no body part list: any)
