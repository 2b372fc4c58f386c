"""Clinical PDF case report rendered with ReportLab.

``render_case_report(data) -> bytes`` turns a plain, already human-readable dict describing
one analysed case (patient, case, per-image AI results, aggregate AI call, the doctor's
signed review or its absence, model provenance, disclaimer) into an A4 PDF.

Design rules:

* Deterministic: the same ``data`` gives byte-identical output (``invariant=1`` fixes the
  creation date and document id; images are re-encoded deterministically; no random ids).
* Standard Type-1 fonts only (Helvetica family), so no font files are needed and the text is
  extractable. Characters outside Latin-1/WinAnsi (e.g. CJK) may not be drawable by these
  fonts; they never make rendering fail.
* All user-supplied text is escaped before it reaches ReportLab's Paragraph markup, so
  ``<b>``, ``<script>`` or ``&amp;`` appear literally and are never interpreted.
* Long free text is laid out as splittable paragraphs (never inside a single table cell), so
  long comments and many images flow over as many pages as needed.
* Every page carries the clinic header and a footer with the case id, the short form of the
  disclaimer and "Page N of M" (two-pass numbered canvas).
"""

from __future__ import annotations

import io
import math
import re
from typing import Any
from xml.sax.saxutils import escape

from PIL import Image as PILImage
from reportlab.graphics.shapes import Drawing, Rect
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    BaseDocTemplate,
    Flowable,
    Frame,
    Image,
    KeepTogether,
    PageBreak,
    PageTemplate,
    Paragraph,
    Spacer,
    Table,
    TableStyle,
)

from ..vocab import percent

__all__ = ["render_case_report"]

# ----------------------------------------------------------------------------- geometry
PAGE_W, PAGE_H = A4
MARGIN_X = 18 * mm
HEADER_H = 24 * mm  # space reserved above the frame for the header
FOOTER_H = 18 * mm  # space reserved below the frame for the footer
FRAME_W = PAGE_W - 2 * MARGIN_X
IMAGE_GAP = 4 * mm
IMAGE_SLOT_W = (FRAME_W - 2 * IMAGE_GAP) / 3  # three images side by side
IMAGE_MAX_H = 62 * mm
IMAGE_MAX_PX = 900  # longest side of an embedded image (≈ 300 dpi at slot width)

# ----------------------------------------------------------------------------- colours
INK = colors.HexColor("#1f2933")
MUTED = colors.HexColor("#616e7c")
RULE = colors.HexColor("#9aa5b1")
LIGHT = colors.HexColor("#f0f4f8")
GRID = colors.HexColor("#cbd2d9")
ACCENT = colors.HexColor("#2f5f8a")
BAR_BG = colors.HexColor("#e4e7eb")
BAR_FG = colors.HexColor("#5b8db8")
BAR_TOP = colors.HexColor("#1f4e79")
OK_BG, OK_FG = colors.HexColor("#e3f4e8"), colors.HexColor("#1e6b3a")
WARN_BG, WARN_FG = colors.HexColor("#fff4d6"), colors.HexColor("#8a5a00")
ERR_BG, ERR_FG = colors.HexColor("#fde2e1"), colors.HexColor("#a61b1b")
DRAFT_FG = colors.HexColor("#b42318")
WATERMARK = colors.Color(0.85, 0.15, 0.1, alpha=0.10)

# ----------------------------------------------------------------------------- styles
_BASE = ParagraphStyle("base", fontName="Helvetica", fontSize=9, leading=12, textColor=INK)
STYLES = {
    "title": ParagraphStyle("title", parent=_BASE, fontName="Helvetica-Bold", fontSize=15, leading=19, spaceAfter=2),
    "subtitle": ParagraphStyle("subtitle", parent=_BASE, textColor=MUTED, spaceAfter=6),
    "h1": ParagraphStyle(
        "h1", parent=_BASE, fontName="Helvetica-Bold", fontSize=11.5, leading=15, textColor=ACCENT,
        spaceBefore=10, spaceAfter=4, keepWithNext=1,
    ),
    "h2": ParagraphStyle(
        "h2", parent=_BASE, fontName="Helvetica-Bold", fontSize=10, leading=13, spaceBefore=6, spaceAfter=3, keepWithNext=1,
    ),
    "body": _BASE,
    "label": ParagraphStyle("label", parent=_BASE, fontName="Helvetica-Bold", fontSize=8, leading=10, textColor=MUTED),
    "fieldlabel": ParagraphStyle(
        "fieldlabel", parent=_BASE, fontName="Helvetica-Bold", fontSize=8, leading=10, textColor=MUTED, keepWithNext=1,
    ),
    "cell": ParagraphStyle("cell", parent=_BASE, fontSize=8.5, leading=11),
    "cellb": ParagraphStyle("cellb", parent=_BASE, fontName="Helvetica-Bold", fontSize=8.5, leading=11),
    "caption": ParagraphStyle("caption", parent=_BASE, fontSize=7.5, leading=9, textColor=MUTED, alignment=TA_CENTER),
    "small": ParagraphStyle("small", parent=_BASE, fontSize=7.5, leading=9.5, textColor=MUTED),
    "diagnosis": ParagraphStyle("diagnosis", parent=_BASE, fontName="Helvetica-Bold", fontSize=12, leading=15.5),
    "box": ParagraphStyle("box", parent=_BASE, fontSize=8.5, leading=11.5),
    "boxhead": ParagraphStyle("boxhead", parent=_BASE, fontName="Helvetica-Bold", fontSize=9.5, leading=12.5),
    "draft": ParagraphStyle(
        "draft", parent=_BASE, fontName="Helvetica-Bold", fontSize=14, leading=18, textColor=DRAFT_FG, alignment=TA_CENTER,
    ),
    "draftbody": ParagraphStyle("draftbody", parent=_BASE, textColor=DRAFT_FG, alignment=TA_CENTER),
}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_MESSAGE_CHARS = 1500
MAX_CELL_CHARS = 400  # table cells cannot split across pages; free text goes in paragraphs


# ============================================================================= text helpers
def _s(value: Any) -> str:
    """Any value as plain text without control characters (None -> "")."""
    if value is None:
        return ""
    return _CONTROL.sub("", str(value)).replace("\r\n", "\n").replace("\r", "\n")


def _esc(value: Any) -> str:
    """Plain text -> Paragraph markup: escaped, newlines kept as line breaks."""
    return escape(_s(value)).replace("\n", "<br/>")


def _p(value: Any, style: str = "body", *, markup: bool = False) -> Paragraph:
    """Paragraph of user text (escaped) or of trusted ``markup`` built here."""
    return Paragraph(value if markup else _esc(value), STYLES[style])


def _or_dash(value: Any) -> str:
    text = _s(value).strip()
    return text if text else "—"


def _cell(value: Any) -> str:
    """Short table-cell text: dash when empty, capped so that a row always fits a page."""
    text = _or_dash(value)
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + "…"


def _truncate(text: str, font: str, size: float, width: float) -> str:
    """Cut plain text with an ellipsis so that it fits ``width`` points (canvas drawing)."""
    if stringWidth(text, font, size) <= width:
        return text
    while text and stringWidth(text + "…", font, size) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _short_disclaimer(disclaimer: str) -> str:
    text = " ".join(_s(disclaimer).split())
    if not text:
        return "AI output is decision support only."
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else text


def _prob(value: Any) -> float | None:
    try:
        p = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(p):
        return None
    return min(max(p, 0.0), 1.0)


# ============================================================================= flowables
def _section(title: str) -> Paragraph:
    return _p(escape(title), "h1", markup=True)


def _field(label: str, value: Any, style: str = "body") -> list[Flowable]:
    """Label above a free-text value; both splittable, so long text can cross pages."""
    return [_p(escape(label), "fieldlabel", markup=True), _p(_or_dash(value), style), Spacer(1, 3)]


def _kv_table(rows: list[tuple]) -> Table:
    """Two label/value pairs per row (identifiers, short fields); a 2-tuple row spans the width."""
    data = []
    cmds: list[tuple] = [("BACKGROUND", (0, 0), (0, -1), LIGHT)]
    for r, row in enumerate(rows):
        if len(row) == 2:
            data.append([_p(escape(row[0]), "label", markup=True), _p(_cell(row[1]), "cell"), "", ""])
            cmds.append(("SPAN", (1, r), (3, r)))
            continue
        cmds.append(("BACKGROUND", (2, r), (2, r), LIGHT))
        l1, v1, l2, v2 = row
        data.append([
            _p(escape(l1), "label", markup=True), _p(_cell(v1), "cell"),
            _p(escape(l2), "label", markup=True), _p(_cell(v2), "cell"),
        ])
    lw = 27 * mm
    vw = FRAME_W / 2 - lw
    table = Table(data, colWidths=[lw, vw, lw, vw], hAlign="LEFT")
    table.setStyle(TableStyle(cmds + [
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("GRID", (0, 0), (-1, -1), 0.4, GRID),
        ("TOPPADDING", (0, 0), (-1, -1), 3),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
        ("LEFTPADDING", (0, 0), (-1, -1), 4),
        ("RIGHTPADDING", (0, 0), (-1, -1), 4),
    ]))
    return table


def _box(rows: list[Flowable], bg: colors.Color, border: colors.Color, width: float = FRAME_W) -> Table:
    """A coloured, bordered box; one row per flowable so it can split between rows."""
    table = Table([[r] for r in rows], colWidths=[width], hAlign="LEFT")
    table.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, -1), bg),
        ("BOX", (0, 0), (-1, -1), 1.0, border),
        ("LEFTPADDING", (0, 0), (-1, -1), 7),
        ("RIGHTPADDING", (0, 0), (-1, -1), 7),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ("TOPPADDING", (0, 0), (-1, 0), 6),
        ("BOTTOMPADDING", (0, -1), (-1, -1), 6),
    ]))
    return table


_STATUS = {
    "ok": ("OK", OK_BG, OK_FG, ""),
    "uncertain": (
        "UNCERTAIN", WARN_BG, WARN_FG,
        "The model is not confident about this result. Manual review of the image is required.",
    ),
    "out_of_domain": (
        "OUT OF DOMAIN", WARN_BG, WARN_FG,
        "The input does not look like the images this model was validated on. "
        "The AI output must not be relied upon.",
    ),
    "error": ("ERROR", ERR_BG, ERR_FG, "The analysis failed; no valid AI result is available."),
    # (a draft printed while images are still being analysed: a signed report never has one)
    "pending": ("NOT YET ANALYSED", WARN_BG, WARN_FG,
                "The analysis of this image had not finished when this draft was printed."),
}


def _status_info(status: Any) -> tuple[str, colors.Color, colors.Color, str]:
    key = _s(status).strip().lower()
    if key in _STATUS:
        return _STATUS[key]
    return (_s(status).upper() or "UNKNOWN", WARN_BG, WARN_FG, "Unrecognised AI status; review manually.")


def _status_block(status: Any, messages: list[Any] | None, subject: str) -> list[Flowable]:
    """A one-line status for "ok"; a prominent warning box for anything else."""
    label, bg, fg, explanation = _status_info(status)
    msgs = [m for m in (_s(x).strip() for x in (messages or [])) if m]
    msgs = [m if len(m) <= MAX_MESSAGE_CHARS else m[:MAX_MESSAGE_CHARS] + "…" for m in msgs]
    colour = fg.hexval()[2:]
    if _s(status).strip().lower() == "ok":
        out: list[Flowable] = [_p(
            f'{escape(subject)} status: <font color="#{colour}"><b>{escape(label)}</b></font>', "body", markup=True,
        )]
        out += [_p(f"• {escape(m)}", "small", markup=True) for m in msgs]
        return out
    rows: list[Flowable] = [_p(
        f'<font color="#{colour}">WARNING — {escape(subject)} status: {escape(label)}</font>', "boxhead", markup=True,
    )]
    if explanation:
        rows.append(_p(escape(explanation), "box", markup=True))
    rows += [_p(f"• {_esc(m)}", "box", markup=True) for m in msgs]
    return [_box(rows, bg, fg)]


def _image_flowable(png: bytes | None, caption: str) -> list[Flowable] | None:
    """Image scaled into one of three slots, with a caption; None when absent.

    The image is flattened onto white and downscaled deterministically, keeping PDFs small.
    Undecodable bytes give a visible placeholder instead of failing the whole report.
    """
    if not png:
        return None
    try:
        with PILImage.open(io.BytesIO(png)) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                flat = PILImage.new("RGB", im.size, (255, 255, 255))
                flat.paste(im, mask=im.split()[-1])
                im = flat
            elif im.mode != "RGB":
                im = im.convert("RGB")
            if max(im.size) > IMAGE_MAX_PX:
                scale = IMAGE_MAX_PX / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), PILImage.LANCZOS)
            w_px, h_px = im.size
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=False)
        scale = min(IMAGE_SLOT_W / w_px, IMAGE_MAX_H / h_px)
        flow: Flowable = Image(io.BytesIO(buf.getvalue()), width=w_px * scale, height=h_px * scale)
    except Exception:  # noqa: BLE001 - a broken image must not break the report
        flow = _box([_p("Image could not be decoded.", "small")], LIGHT, GRID, width=IMAGE_SLOT_W - 4)
    return [flow, Spacer(1, 2), _p(caption, "caption")]


def _image_row(img: dict) -> Table | None:
    cells = [
        c for c in (
            _image_flowable(img.get("original_png"), "Original"),
            _image_flowable(img.get("cells_png"), "Cell mask overlay"),
            _image_flowable(img.get("heatmap_png"), "Grad-CAM heatmap"),
        ) if c is not None
    ]
    if not cells:
        return None
    table = Table([cells], colWidths=[IMAGE_SLOT_W + (IMAGE_GAP if i < len(cells) - 1 else 0) for i in range(len(cells))],
                  hAlign="LEFT")
    table.setStyle(TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("ALIGN", (0, 0), (-1, -1), "CENTER"),
        ("LEFTPADDING", (0, 0), (-1, -1), 0),
        ("RIGHTPADDING", (0, 0), (-1, -1), 0),
        ("RIGHTPADDING", (0, 0), (-2, -1), IMAGE_GAP),
        ("TOPPADDING", (0, 0), (-1, -1), 0),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 0),
    ]))
    return table


def _bar(p: float | None, top: bool, width: float = 70 * mm, height: float = 3.4 * mm) -> Drawing:
    d = Drawing(width, height)
    d.add(Rect(0, 0, width, height, fillColor=BAR_BG, strokeColor=None))
    if p:
        d.add(Rect(0, 0, width * p, height, fillColor=BAR_TOP if top else BAR_FG, strokeColor=None))
    return d


def _prob_table(probabilities: dict | None) -> Flowable:
    items = []
    for name, value in (probabilities or {}).items():
        items.append((_s(name), _prob(value)))
    if not items:
        return _p("No class probabilities available.", "small")
    # Highest first; ties broken by name so output is stable whatever the dict order.
    items.sort(key=lambda kv: (-(kv[1] if kv[1] is not None else -1.0), kv[0]))
    best = items[0][1]
    rows = [[_p("Class", "label"), _p("Probability", "label"), _p("", "label")]]
    for name, p in items:
        top = p is not None and p == best
        rows.append([
            _p(_cell(name), "cellb" if top else "cell"),
            _p("—" if p is None else percent(p), "cellb" if top else "cell"),
            _bar(p, top),
        ])
    table = Table(rows, colWidths=[FRAME_W - 22 * mm - 74 * mm, 22 * mm, 74 * mm], hAlign="LEFT", repeatRows=1)
    table.setStyle(TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("LINEBELOW", (0, 0), (-1, 0), 0.6, RULE),
        ("LINEBELOW", (0, 1), (-1, -1), 0.25, GRID),
        ("ALIGN", (1, 0), (1, -1), "RIGHT"),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ("LEFTPADDING", (0, 0), (-1, -1), 4),
        ("RIGHTPADDING", (0, 0), (-1, -1), 4),
    ]))
    return table


def _image_section(index: int, img: dict) -> list[Flowable]:
    title = _s(img.get("title")).strip() or f"Image {index}"
    head: list[Flowable] = [_p(title, "h2")]
    row = _image_row(img)
    if row is not None:
        head += [row, Spacer(1, 5)]
    else:
        head += [_p("No images available for this field.", "small"), Spacer(1, 3)]

    label = _s(img.get("ai_label")).strip()
    count = img.get("cell_count")
    count_text = "not available" if count is None else _s(count)
    cells_text = (f"&nbsp;&nbsp;&nbsp;&nbsp;Cells detected: <b>{escape(count_text)}</b>"
                  if img.get("counts_cells", True) else "")
    summary = _p(f"AI suggestion: <b>{_esc(label) if label else 'none'}</b>{cells_text}", "body", markup=True)
    body: list[Flowable] = [summary, Spacer(1, 3), _prob_table(img.get("probabilities")), Spacer(1, 4)]
    body += _status_block(img.get("ai_status"), img.get("messages"), "AI")
    # Keep the title, pictures and result together where they fit; KeepTogether still
    # splits when the block is taller than a page.
    return [KeepTogether(head + body), Spacer(1, 8)]


def _aggregate_section(agg: dict) -> list[Flowable]:
    label = _s(agg.get("ai_label")).strip()
    out: list[Flowable] = [
        _section("Aggregate AI call"),
        _p(f"AI suggestion for the case: <b>{_esc(label) if label else 'none'}</b>", "body", markup=True),
        Spacer(1, 2),
    ]
    text = _s(agg.get("text")).strip()
    if text:
        out += [_p(text), Spacer(1, 3)]
    interpretation = _s(agg.get("interpretation")).strip()
    if interpretation:
        out += [_p(f"AI interpretation (to be confirmed): {interpretation}"), Spacer(1, 3)]
    out += _status_block(agg.get("ai_status"), [], "Aggregate AI")
    return out


def _review_section(review: dict | None) -> list[Flowable]:
    heading = _section("Physician review")
    if not review:
        return [_unsigned_block(heading)]
    version = review.get("version")
    agrees = review.get("agrees_with_ai")
    agrees_text = "Yes" if agrees is True else "No" if agrees is False else "— (no AI call)"
    # Diagnosis, signer and signing time stay on one page (KeepTogether still splits if huge).
    out: list[Flowable] = [KeepTogether([heading] + _field("Final diagnosis", review.get("final_diagnosis"),
                                                           "diagnosis") + [_kv_table([
        ("Agrees with AI", agrees_text, "Report version", version),
        ("Signed by", review.get("signed_by"), "Signed at", review.get("signed_at")),
    ])])]
    out.append(Spacer(1, 5))
    if _s(review.get("override_reason")).strip() or agrees is False:
        label = "Reason for overriding the AI result" if agrees is False else "Reason for the diagnosis"
        out += _field(label, review.get("override_reason"))
    if _s(review.get("uncertainty_note")).strip():
        out += _field("Uncertainty note", review.get("uncertainty_note"))
    out += _field("Comment", review.get("comment"))
    if _s(review.get("amendment_reason")).strip():
        out += _field("Amendment reason", review.get("amendment_reason"))
    previous = review.get("previous_versions") or []
    if previous:
        out += [_p("Amendment history", "h2"), _history_table(review, previous)]
    return out


def _unsigned_block(heading: Flowable) -> KeepTogether:
    """The red "not signed" box that stands where the physician's review would be."""
    return KeepTogether([heading, _box(
        [
            _p("DRAFT — NOT SIGNED", "draft"),
            _p(
                "This report has not been reviewed or signed by a physician. It contains AI decision "
                "support output only and must not be used as a diagnosis.",
                "draftbody",
            ),
        ],
        colors.HexColor("#fff1f0"), DRAFT_FG,
    ), Spacer(1, 4), _kv_table([("Signed by", "— (not signed)", "Signed at", "—")])])


def _history_table(review: dict, previous: list[dict]) -> Table:
    """Every signed version, the current one first, then the superseded ones newest first."""
    rows = [[_p(h, "label") for h in ("Version", "Final diagnosis", "Signed by", "Signed at")]]
    rows.append([
        _p(f"{_s(review.get('version'))} (current)", "cellb"), _p(_cell(review.get("final_diagnosis")), "cellb"),
        _p(_cell(review.get("signed_by")), "cellb"), _p(_cell(review.get("signed_at")), "cellb"),
    ])
    ordered = sorted(previous, key=lambda v: (-_int(v.get("version")), _s(v.get("signed_at"))))
    for prev in ordered:
        rows.append([
            _p(f"{_s(prev.get('version'))} (superseded)", "cell"), _p(_cell(prev.get("final_diagnosis")), "cell"),
            _p(_cell(prev.get("signed_by")), "cell"), _p(_cell(prev.get("signed_at")), "cell"),
        ])
    table = Table(rows, colWidths=[26 * mm, FRAME_W - 26 * mm - 45 * mm - 38 * mm, 45 * mm, 38 * mm],
                  hAlign="LEFT", repeatRows=1)
    table.setStyle(TableStyle([
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("BACKGROUND", (0, 0), (-1, 0), LIGHT),
        ("GRID", (0, 0), (-1, -1), 0.4, GRID),
        ("TOPPADDING", (0, 0), (-1, -1), 2.5),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2.5),
    ]))
    return table


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _model_section(model: dict) -> list[Flowable]:
    sha = re.sub(r"[^0-9a-fA-F]", "", _s(model.get("sha256")))[:16].lower()
    rows = [
        ("Model", model.get("id"), "Version", model.get("version")),
        ("SHA-256", f"{sha}… (first 16 hex digits)" if sha else "—"),
    ]
    out: list[Flowable] = [_section("AI model"), _kv_table(rows), Spacer(1, 4)]
    out += _field("Validation", model.get("validation_summary"), "cell")
    return out


# ============================================================================= page furniture
class _Furniture:
    """Everything drawn on every page: clinic header, draft watermark, footer."""

    def __init__(self, data: dict):
        clinic = data.get("clinic") or {}
        patient = data.get("patient") or {}
        case = data.get("case") or {}
        self.clinic_name = _s(clinic.get("name")).strip() or "Laboratory"
        self.clinic_address = " ".join(_s(clinic.get("address")).split())
        self.patient_line = f"{_s(patient.get('name')).strip() or '—'} · MRN {_s(patient.get('mrn')).strip() or '—'}"
        self.case_line = f"Case {_s(case.get('id'))}"
        review = data.get("review")
        if review:
            self.case_line += f" · signed version {_s(review.get('version'))}"
        else:
            self.case_line += " · DRAFT — NOT SIGNED"
        self.draft = not review
        self.disclaimer = _short_disclaimer(_s(data.get("disclaimer")))
        self.kind = _s(data.get("report_kind")).strip() or "Laboratory report"
        self.lifecycle = " ".join(_s(data.get("lifecycle")).split())

    def header(self, canv: Canvas, _doc: Any = None) -> None:
        canv.saveState()
        top = PAGE_H - 12 * mm
        right = PAGE_W - MARGIN_X
        canv.setFillColor(INK)
        canv.setFont("Helvetica-Bold", 9.5)
        label_w = stringWidth(self.kind, "Helvetica-Bold", 9.5)
        canv.setFont("Helvetica-Bold", 13)
        canv.drawString(MARGIN_X, top, _truncate(self.clinic_name, "Helvetica-Bold", 13, FRAME_W - label_w - 12 * mm))
        canv.setFont("Helvetica-Bold", 9.5)
        canv.drawRightString(right, top + 1, self.kind)
        canv.setFillColor(MUTED)
        half = FRAME_W / 2 - 4 * mm
        if self.clinic_address:
            canv.setFont("Helvetica", 8)
            canv.drawString(MARGIN_X, top - 11, _truncate(self.clinic_address, "Helvetica", 8, half))
        canv.setFont("Helvetica", 8)
        canv.drawRightString(right, top - 11, _truncate(self.patient_line, "Helvetica", 8, half))
        canv.setStrokeColor(RULE)
        canv.setLineWidth(0.6)
        y = top - 17
        canv.line(MARGIN_X, y, right, y)
        if self.lifecycle:  # who moved the report to each state, when (below the rule, above the body)
            canv.setFillColor(INK)
            canv.setFont("Helvetica", 7.5)
            canv.drawString(MARGIN_X, y - 9, _truncate(self.lifecycle, "Helvetica", 7.5, FRAME_W))
        if self.draft:
            canv.setFillColor(WATERMARK)
            canv.setFont("Helvetica-Bold", 64)
            canv.translate(PAGE_W / 2, PAGE_H / 2)
            canv.rotate(45)
            canv.drawCentredString(0, -20, "DRAFT — NOT SIGNED")
        canv.restoreState()

    def footer(self, canv: Canvas, page: int, total: int) -> None:
        canv.saveState()
        right = PAGE_W - MARGIN_X
        y_rule = FOOTER_H - 4 * mm
        canv.setStrokeColor(RULE)
        canv.setLineWidth(0.4)
        canv.line(MARGIN_X, y_rule, right, y_rule)
        page_text = f"Page {page} of {total}"
        canv.setFillColor(INK)
        canv.setFont("Helvetica-Bold", 8)
        canv.drawRightString(right, y_rule - 10, page_text)
        page_w = stringWidth(page_text, "Helvetica-Bold", 8)
        canv.setFont("Helvetica", 8)
        canv.drawString(MARGIN_X, y_rule - 10, _truncate(self.case_line, "Helvetica", 8, FRAME_W - page_w - 8 * mm))
        canv.setFillColor(MUTED)
        canv.setFont("Helvetica-Oblique", 7)
        canv.drawString(MARGIN_X, y_rule - 20, _truncate(self.disclaimer, "Helvetica-Oblique", 7, FRAME_W))
        canv.restoreState()


def _numbered_canvas_maker(furniture: _Furniture):
    """``canvasmaker`` for a two-pass "Page N of M" footer: pages are buffered, then each is
    finished with the footer once the total is known."""

    class NumberedCanvas(Canvas):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["invariant"] = 1
            super().__init__(*args, **kwargs)
            self._pages: list[dict] = []

        def showPage(self) -> None:  # noqa: N802 - ReportLab API
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for number, state in enumerate(self._pages, start=1):
                self.__dict__.update(state)
                furniture.footer(self, number, total)
                Canvas.showPage(self)
            Canvas.save(self)

    return NumberedCanvas


# ============================================================================= entry point
def render_case_report(data: dict) -> bytes:
    """Render one case as an A4 PDF and return its bytes (deterministic for equal ``data``)."""
    furniture = _Furniture(data)
    buf = io.BytesIO()
    doc = _document(buf, data, furniture)
    # Zero frame padding so the body aligns exactly with the header rule and FRAME_W.
    frame = Frame(doc.leftMargin, doc.bottomMargin, doc.width, doc.height, id="body",
                  leftPadding=0, rightPadding=0, topPadding=0, bottomPadding=0)
    doc.addPageTemplates([PageTemplate(id="page", frames=[frame], onPage=furniture.header)])
    doc.build(_story(data), canvasmaker=_numbered_canvas_maker(furniture))
    return buf.getvalue()


def _document(buf: io.BytesIO, data: dict, furniture: _Furniture) -> BaseDocTemplate:
    """The A4 document with its metadata (``invariant``: no creation date or random document id)."""
    clinic = data.get("clinic") or {}
    case = data.get("case") or {}
    return BaseDocTemplate(
        buf,
        pagesize=A4,
        leftMargin=MARGIN_X,
        rightMargin=MARGIN_X,
        topMargin=HEADER_H,
        bottomMargin=FOOTER_H + 2 * mm,
        title=f"{furniture.kind} — case {_s(case.get('id'))}",
        author=_s(clinic.get("name")),
        subject=f"{_s(case.get('analyzer_name'))} — AI-assisted analysis",
        creator="oncoscope",
        producer="oncoscope (ReportLab)",
        keywords="",
        invariant=1,
    )


def _story(data: dict) -> list[Flowable]:
    """The body, top to bottom: title, patient and case, the physician's review and the AI's call for
    the case (a reader finds the diagnosis on page 1, however many images follow), the differential,
    each image, the model, the decision-support statement, and an appendix page about the diagnosis."""
    images = data.get("images") or []
    story = _title_block(data.get("case") or {}, data.get("review"))
    story += _patient_case_section(data.get("patient") or {}, data.get("case") or {})
    story += _review_section(data.get("review"))
    story += _aggregate_section(data.get("aggregate") or {})
    story += _differential_section(data.get("differential"))
    story += _review_cells_section(data.get("review_cells"))
    if not images:
        story += [_section("AI result per image"), _p("No images were analysed for this case.", "small")]
    for i, img in enumerate(images, start=1):
        block = _image_section(i, img or {})
        # (the heading goes with the first image: keepWithNext does not hold before a KeepTogether)
        story += [KeepTogether([_section("AI result per image"), *block])] if i == 1 else block
    story += _model_section(data.get("model") or {})
    story += _statement(data)
    story += _about_section(data.get("about"))
    return story


def _pct_cell(v: Any) -> str:
    return "–" if v is None else f"{float(v):.1f}%"


def _differential_section(d: dict | None) -> list[Flowable]:
    """White-cell differential: the AI's pre-classification and, once signed, the verified counts."""
    if not d:
        return []
    signed = d.get("signed")
    # "Signed", not "verified": a signer may confirm some cells with the AI's class unverified (said below)
    head = ["Class", "AI cells", "AI %"] + (["Signed cells", "Signed %"] if signed else [])
    rows = [[_p(h, "label") for h in head]]
    cmds: list[tuple] = []
    for r, row in enumerate(d.get("rows") or [], start=1):
        vals = [_s(row.get("class")).capitalize(), _s(row.get("ai")), _pct_cell(row.get("ai_pct"))]
        if signed:
            vals += [_s(row.get("verified")), _pct_cell(row.get("verified_pct"))]
        style = "cellb" if row.get("flag") else "cell"
        rows.append([_p(escape(v), style, markup=True) for v in vals])
        if row.get("flag"):
            cmds += [("BACKGROUND", (0, r), (-1, r), ERR_BG)]
    widths = [FRAME_W - (len(head) - 1) * 28 * mm] + [28 * mm] * (len(head) - 1)
    table = Table(rows, colWidths=widths, hAlign="LEFT", repeatRows=1)
    table.setStyle(TableStyle(cmds + [("BACKGROUND", (0, 0), (-1, 0), LIGHT), ("GRID", (0, 0), (-1, -1), 0.4, GRID),
                                      ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]))
    out: list[Flowable] = [_section("White-cell differential"), table]
    if signed:
        agreement = d.get("agreement")
        line = (f"{_s(d.get('white_cells'))} white cells counted (target {_s(d.get('count_target'))}); "
                f"{_s(d.get('verified'))} of {_s(d.get('cells'))} cells verified by the signer"
                + (f", AI agreement {100 * float(agreement):.0f}%" if agreement is not None else "")
                + (f"; {_s(d.get('unverified'))} left with the AI's class (confirmed at sign-off)"
                   if d.get("unverified") else "") + ".")
        out.append(_p(escape(line), "small", markup=True))
        if any(row.get("flag") for row in d.get("rows") or []):
            out.append(_p(escape(f"Blasts at or above the laboratory's flag ({_s(d.get('blast_flag_pct'))}%)."),
                          "cellb", markup=True))
        if d.get("wbc_count") is not None and d.get("absolute"):
            absolute = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in d["absolute"].items() if v)
            out.append(_p(escape(f"WBC {d['wbc_count']:g} x10^9/L; absolute counts (x10^9/L): {absolute}."),
                          "small", markup=True))
    else:
        out.append(_p("AI pre-classification only: the differential is verified cell by cell before signing.",
                      "small"))
    return out


def _review_cells_section(d: dict | None) -> list[Flowable]:
    """A page of pictures: every blast and unidentified cell (up to a limit), as the gallery shows them."""
    if not d or not d.get("cells"):
        return []
    side, per_row = 22 * mm, 7
    tiles = []
    for c in d["cells"]:
        img = Image(io.BytesIO(c["png"]), width=side, height=side)
        caption = c["label"] + ("" if c["label"] == c["ai"] else f" (AI: {c['ai']})") + ("" if c["verified"] else " *")
        tiles.append([img, _p(escape(caption), "small", markup=True)])
    rows = [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)]
    rows[-1] += [""] * (per_row - len(rows[-1]))
    table = Table(rows, colWidths=[FRAME_W / per_row] * per_row, hAlign="LEFT")
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("ALIGN", (0, 0), (-1, -1), "CENTER")]))
    more = d["total"] - len(d["cells"])
    note = (f"Each picture is {d.get('window_um', 24):g} µm across (one physical scale). * not verified."
            + (f" {more} more in the cell gallery." if more > 0 else ""))
    return [PageBreak(), _section("Blasts and unidentified cells"), table, _p(escape(note), "small", markup=True)]


def _title_block(case: dict, review: dict | None) -> list[Flowable]:
    analyzer = _s(case.get("analyzer_name")).strip() or "Image analysis"
    state = (
        f"Signed report, version {_s(review.get('version'))}" if review
        else "Draft — not signed by a physician"
    )
    return [_p(f"{analyzer} — AI-assisted analysis", "title"), _p(f"Case {_s(case.get('id'))} · {state}", "subtitle")]


def _patient_case_section(patient: dict, case: dict) -> list[Flowable]:
    out: list[Flowable] = [_section("Patient and case"), _kv_table([
        ("Patient", patient.get("name"), "MRN", patient.get("mrn")),
        ("Date of birth", patient.get("birth_date"), "Sex", patient.get("sex")),
        ("Case ID", case.get("id"), "Created", case.get("created_at")),
        ("Analyzer", case.get("analyzer_name"), "Analyzer ID", case.get("analyzer_id")),
        *([("Accession", case.get("accession") or "—", "LIS order", case.get("placer_order") or "—")]
          if case.get("accession") or case.get("placer_order") else []),
    ]), Spacer(1, 4)]
    out += _field("Examination", case.get("finding"))
    out += _field("Clinical note", case.get("clinical_note"))
    return out


def _statement(data: dict) -> list[Flowable]:
    """The decision-support statement, and the note on what this report is."""
    disclaimer = _s(data.get("disclaimer")).strip() or "AI output is decision support only."
    out: list[Flowable] = [Spacer(1, 8), KeepTogether([_box(
        [_p("Decision support statement", "boxhead"), _p(disclaimer, "box")],
        colors.HexColor("#eef4fb"), ACCENT,
    )])]
    note = _s(data.get("generated_note")).strip()
    if note:
        out += [Spacer(1, 6), _p(note, "small")]
    return out


def _about_section(about: list[dict] | None) -> list[Flowable]:
    """Appendix page: what the signed diagnosis (and the AI's call, when different) means, what usually
    confirms it and when to refer, with references: the analyzer's class information."""
    if not about:
        return []
    out: list[Flowable] = [PageBreak(), _section("Appendix: About this diagnosis"), _p(
        "General information about the diagnosis, written for this analyzer. It is not part of the signed "
        "findings and does not replace local guidelines or specialist advice.", "small"), Spacer(1, 4)]
    for entry in about:
        block: list[Flowable] = [_p(f'{_esc(entry.get("name"))} <font color="#{MUTED.hexval()[2:]}">'
                                    f'({_esc(entry.get("role"))})</font>', "h2", markup=True)]
        block += _field("What it means", entry.get("summary"))
        block += _field("What usually confirms it", entry.get("confirmation"))
        block += _field("When to refer", entry.get("referral"))
        refs = entry.get("references") or []
        if refs:
            block.append(_p("References", "fieldlabel"))
            for i, ref in enumerate(refs, start=1):
                url = _s(ref.get("url")).strip()
                link = (f' <a href="{escape(url, {chr(34): "&quot;"})}" color="#{ACCENT.hexval()[2:]}">{_esc(url)}</a>'
                        if url else "")
                block.append(_p(f"{i}. {_esc(ref.get('text'))}{link}", "small", markup=True))
        out += [KeepTogether(block), Spacer(1, 10)]
    return out
