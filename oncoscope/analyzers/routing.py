"""Which analyzer reads a DICOM image that arrives without a person choosing (C-STORE from a modality
or PACS, WADO-RS retrieval): a table of rules on Modality, Body Part Examined and SOP Class, first
match wins. Unmatched images are stored, not analysed (the DICOM inbox).

The table is ``ONCOSCOPE_DICOM_ROUTES``: rules separated by ``;``, each
``MODALITIES[/BODY PARTS[/SOP CLASS UIDS]]=analyzer``, every part a comma-separated list or ``*``;
``-`` in the body parts matches an image that does not state one. Example:
``MR/HEAD,BRAIN,-=brain-mri; CR,DX/*=bone-xray``. Unset, the table comes from the installed
analyzers' configs: the DICOM modalities each accepts and the body parts its checks accept (and
images stating none, which the analyzer itself then checks)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import registry
from .config import AnalyzerConfig

ANY = "*"
NOT_STATED = "-"


class RouteError(ValueError):
    """The routing table cannot be read (named rule and reason)."""


@dataclass(frozen=True)
class Rule:
    modalities: frozenset[str]  # empty: any
    body_parts: frozenset[str]  # empty: any; "-" matches an image that states none
    sop_classes: frozenset[str]  # empty: any
    analyzer_id: str

    def matches(self, modality: str, body_part: str, sop_class: str) -> bool:
        return ((not self.modalities or modality.upper() in self.modalities)
                and (not self.body_parts or (body_part.upper() or NOT_STATED) in self.body_parts)
                and (not self.sop_classes or sop_class in self.sop_classes))

    def describe(self) -> str:
        def part(values):
            return ",".join(sorted(values)) or ANY
        return f"{part(self.modalities)}/{part(self.body_parts)}/{part(self.sop_classes)}={self.analyzer_id}"


def _values(text: str) -> frozenset[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    return frozenset() if not items or ANY in items else frozenset(items)


def parse(text: str, known: list[str] | None = None) -> list[Rule]:
    """The rules of a table written as above (RouteError naming the rule that cannot be read)."""
    known = registry.available() if known is None else known
    rules = []
    for raw in (r.strip() for r in text.split(";")):
        if not raw:
            continue
        match, sep, analyzer_id = raw.rpartition("=")
        parts = match.split("/")
        if not sep or not match.strip() or len(parts) > 3:
            raise RouteError(f"DICOM route {raw!r}: write MODALITIES[/BODY PARTS[/SOP CLASSES]]=analyzer")
        analyzer_id = analyzer_id.strip()
        if analyzer_id not in known:
            raise RouteError(f"DICOM route {raw!r}: unknown analyzer {analyzer_id!r} (installed: {', '.join(known)})")
        parts += [ANY] * (3 - len(parts))
        rules.append(Rule(frozenset(v.upper() for v in _values(parts[0])),
                          frozenset(v.upper() for v in _values(parts[1])), _values(parts[2]), analyzer_id))
    return rules


@lru_cache(maxsize=None)
def analyzer_config(analyzer_id: str) -> AnalyzerConfig:
    """An installed analyzer's config, read once per process (without loading its model)."""
    return AnalyzerConfig.load(registry.MODELS_DIR / analyzer_id)


def defaults() -> list[Rule]:
    """The table the installed analyzers' configs imply (analyzers that name no DICOM modality, like
    the smear analyzers, receive nothing unless a rule names them)."""
    rules = []
    for aid in registry.available():
        cfg = analyzer_config(aid)
        if not cfg.dicom_modalities:
            continue
        parts = cfg.dicom_checks.body_parts
        rules.append(Rule(frozenset(cfg.dicom_modalities), frozenset(parts) | {NOT_STATED} if parts else frozenset(),
                          frozenset(), aid))
    return rules


# modalities whose images are radiology: an analyzer that names no DICOM modality (a microscopy one)
# does not read them
RADIOLOGY = frozenset({"CR", "CT", "DR", "DX", "MG", "MR", "NM", "PT", "RF", "RG", "US", "XA"})


def can_read(analyzer_id: str, modality: str, body_part: str = "") -> bool:
    """Whether an analyzer reads images of this modality (and body part, when the study names one and the
    analyzer's DICOM checks list theirs) at all: what a person may file a study under."""
    cfg = analyzer_config(analyzer_id)
    modality, body_part = (modality or "").upper(), (body_part or "").strip().upper()
    parts = cfg.dicom_checks.body_parts
    if body_part and parts and body_part not in parts:
        return False  # (its analysis would refuse every image: a knee MR under a brain MR analyzer)
    if cfg.dicom_modalities:
        return modality in cfg.dicom_modalities
    return modality not in RADIOLOGY


def table(text: str) -> list[Rule]:
    """The configured table, else the default one."""
    return parse(text) if text.strip() else defaults()


def route(rules: list[Rule], modality: str, body_part: str, sop_class: str) -> str | None:
    """The analyzer for an image, or None (stored, not analysed)."""
    return next((r.analyzer_id for r in rules if r.matches(modality, body_part, sop_class or "")), None)
