"""Figures per source (collection, institution) and for sources left out of training, and the
Grad-CAM pointing game, for radiology analyzers whose split joins several collections.

A figure on the pooled test split hides which collection carries it; the card shows each source's
tumour-call sensitivity, specificity, referrals and *confident misses* (status ok, tumour called
absent), and the same for models that never saw the source (leave one source out), the figure a
new hospital should expect.
"""

from __future__ import annotations

from collections import defaultdict


from ..ml.metrics import wilson
from ..training import loso


def _rate(k: int, n: int) -> dict | None:
    if n == 0:
        return None
    p, lo, hi = wilson(k, n)
    return {"k": int(k), "n": int(n), "rate": round(p, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def call_figures(rows: list[dict], malignant: set[str]) -> dict:
    """Rows: label, status, called (bool), top. Confident errors are the ones nobody is asked to
    look at again: status ok and the tumour call wrong."""
    tumour = [r for r in rows if r["label"] in malignant]
    clear = [r for r in rows if r["label"] not in malignant]
    fig = {
        "n": len(rows), "tumour_images": len(tumour), "no_tumour_images": len(clear),
        "sensitivity": _rate(sum(r["called"] for r in tumour), len(tumour)),
        "specificity": _rate(sum(not r["called"] for r in clear), len(clear)),
        "referred": _rate(sum(r["status"] != "ok" for r in rows), len(rows)),
        "out_of_domain": _rate(sum(r["status"] == "out_of_domain" for r in rows), len(rows)),
        "confident_misses": _rate(sum(r["status"] == "ok" and not r["called"] for r in tumour), len(tumour)),
        "confident_false_alarms": _rate(sum(r["status"] == "ok" and r["called"] for r in clear), len(clear)),
    }
    if len({r["label"] for r in tumour}) > 1:  # a source with several tumour types
        fig["accuracy"] = _rate(sum(r["top"] == r["label"] for r in rows), len(rows))
    return fig


def pointing_figures(points: list[dict | None]) -> dict | None:
    """Of the tumour slices called tumour, the share whose heatmap peak is inside the mask (and
    within a few pixels of it)."""
    scored = [p for p in points if p is not None]
    if not points:
        return None
    return {"slices": len(points), "no_tumour_call": len(points) - len(scored),
            "inside_mask": _rate(sum(p["hit"] for p in scored), len(scored)),
            f"within_{loso.POINTING_TOLERANCE_PX}px": _rate(sum(p["near"] for p in scored), len(scored))}


def per_source(ev) -> dict:
    """The shipped model on the test split, one row of figures per source."""
    malignant = set(ev.an.malignant_labels)
    called = ev.probs[:, ev.mal].sum(1) >= ev.thr
    by: dict[str, list[dict]] = defaultdict(list)
    blocks: dict[str, set] = defaultdict(set)
    for i, s in enumerate(ev.test):
        entry = ev.manifest["files"][s.path]
        src = entry.get("source", ev.manifest["dataset"])
        blocks[src].add(entry["block"])
        # top: the network's own class (the served label may withhold the type, counted apart); none
        # for an image refused as out of domain, which is given no class
        top = None if ev.st[i] == "out_of_domain" else ev.an.labels[int(ev.probs[i].argmax())]
        by[src].append({"label": s.label, "status": str(ev.st[i]), "called": bool(called[i]), "top": top,
                        "served": ev.results[i].label})
    # blocks: patients (TCGA) or groups of copies; slices of one patient are not independent
    out = {src: dict(call_figures(rows, malignant), blocks=len(blocks[src])) for src, rows in sorted(by.items())}
    if ev.an.untyped_label:
        for src, rows in by.items():
            out[src]["type_suggestion"] = type_figures(rows, ev.an.positive_calls, ev.an.untyped_label)
    return out


def type_figures(rows: list[dict], positive_calls: set[str], untyped: str) -> dict:
    """Of the tumour images given a tumour call on top, how many carry a type, and how many of those
    types are right."""
    shown = [r for r in rows if r["label"] in positive_calls and r["served"] in positive_calls]
    typed = [r for r in shown if r["served"] != untyped]
    return {"tumour_calls": len(shown), "typed": _rate(len(typed), len(shown)),
            "type_right": _rate(sum(r["served"] == r["label"] for r in typed), len(typed))}


def class_sources(manifest: dict) -> dict[str, list[str]]:
    """The collections each class comes from (a TCGA institution counts as its collection): a class
    from one collection alone can be learnt as that collection's look, and the card must say so."""
    out: dict[str, set[str]] = defaultdict(set)
    for e in manifest["files"].values():
        if not e.get("error"):
            out[e["label"]].add(e.get("source", manifest["dataset"]).split("/")[0])
    return {label: sorted(v) for label, v in sorted(out.items())}


def class_sources_line(sources: dict[str, list[str]], names: dict[str, str]) -> str:
    single = [label for label, v in sources.items() if len(v) == 1]
    where = "; ".join(f"{names.get(k, k)}: {', '.join(v)}" for k, v in sources.items())
    if not single:
        return f"- Collections per class: {where}."
    if len(single) == len(sources) and len({v[0] for v in sources.values()}) == 1:
        return (f"- Collections per class: every class comes from one collection ({where.split(': ')[-1]}): the "
                "model may have learnt that collection's look along with the classes; another hospital's images "
                "are a new source.")
    return (f"- Collections per class: {where}. **From one collection only: "
            f"{', '.join(names.get(k, k) for k in single)}**: the model may have learnt that collection's look "
            "for these classes.")


def test_pointing(ev, analyzer_id: str) -> dict | None:
    masks = loso.mask_paths(analyzer_id)
    pts = [loso.pointing(ev.results[i], masks[s.path], ev.an.positive_calls)
           for i, s in enumerate(ev.test) if s.path in masks]
    return pointing_figures(pts) if pts else None


def left_out(records: list[dict], malignant: set[str], band: float | None, scale: float = 1.0) -> dict:
    """Leave-one-source-out figures per left-out source, on all its images and on its test images,
    with the shipped referral rule applied (``scale``: the out-of-domain threshold's factor;
    ``band``: confident 'no tumour' only below it), and without it."""
    out = {}
    for name in sorted({r["left_out"] for r in records}):
        mine = [r for r in records if r["left_out"] == name]
        rows = [_row(r, band, scale) for r in mine]
        out[name] = {
            "blocks": len({r.get("block") for r in mine}),
            "all_images": call_figures(rows, malignant),
            "test_images": dict(call_figures([x for x, r in zip(rows, mine) if r["split"] == "test"], malignant),
                                blocks=len({r.get("block") for r in mine if r["split"] == "test"})),
            "without_referral_rule": call_figures([_row(r, None, 1.0) for r in mine], malignant),
            "pointing": pointing_figures([r["pointing"] for r in mine if "pointing" in r]),
        }
    return out


def _row(r: dict, band: float | None, scale: float) -> dict:
    return {"label": r["label"], "status": loso.status_under(r, band, scale), "called": loso.called(r),
            "top": r["top"]}


# ----------------------------------------------------------------------------- card text
def _pct(x: dict | None) -> str:
    if not x:
        return "-"
    return f"{100 * x['rate']:.1f}% ({100 * x['ci95'][0]:.0f}-{100 * x['ci95'][1]:.0f}; {x['k']}/{x['n']})"


def _table(rows: dict, positive: str) -> list[str]:
    out = [f"| source | n (blocks) | {positive} sensitivity | specificity | referred | confident misses (of tumour images) | "
           "confident false alarms | 4-class accuracy |", "|---|---|---|---|---|---|---|---|"]
    for name, f in rows.items():
        blocks = f" ({f['blocks']})" if f.get("blocks") else ""
        out.append(f"| {name} | {f['n']}{blocks} | {_pct(f['sensitivity'])} | {_pct(f['specificity'])} | "
                   f"{_pct(f['referred'])} | {_pct(f['confident_misses'])} | {_pct(f['confident_false_alarms'])} | "
                   f"{_pct(f.get('accuracy'))} |")
    return out


def source_markdown(card: dict, positive: str) -> list[str]:
    """The card's per-source, leave-one-source-out and localisation sections (empty without sources)."""
    if "sources" not in card:
        return []
    cal = card.get("calibration") or {}
    L = ["", "## Per source (test split)",
         "Each image carries its collection (and, for TCGA, the institution in the patient id). Percentages with "
         "95% Wilson intervals over images; blocks are patients (TCGA) or groups of copies, and slices of one "
         "patient are not independent, so read small sources as a few patients. A *confident miss* is a tumour "
         "image answered 'no tumour' with status ok.", "",
         *_table(card["sources"], positive)]
    lo = card.get("leave_one_source_out")
    if lo:
        band = cal.get("confident_negative_below")
        scale = (cal.get("confident_negative_rule") or {}).get("ood_threshold_scale", 1.0)
        L += ["", "## Leave one source out (the estimate for a new collection)",
              "One model trained without each source, run on every image of it (none was seen in training). "
              + (f"The shipped referral rule is applied: out of domain above {scale} x the validation distance "
                 f"threshold, and 'no tumour' ok only when P({positive}) < {band}, both fitted on the whole "
                 "collections' non-test images; the last table shows the same runs without that rule."
                 if band is not None else ""),
              "", "All images of the left-out source:", "",
              *_table({k: dict(v["all_images"], blocks=v["blocks"]) for k, v in lo.items()}, positive),
              "", "Only their test-split images (nothing was fitted on them):", "",
              *_table({k: v["test_images"] for k, v in lo.items()}, positive),
              "", "Without the referral rule (the models' own validation thresholds):", "",
              *_table({k: v["without_referral_rule"] for k, v in lo.items()}, positive)]
    types = {k: v["type_suggestion"] for k, v in card["sources"].items() if v.get("type_suggestion")}
    if types:
        td = cal.get("type_domain") or {}
        L += ["", "## Tumour type suggestion (test split)",
              "The type is shown only on slices like the tumours of the collections with every type "
              f"({', '.join(td.get('sources', []))}; distance threshold {td.get('threshold')}, "
              f"{td.get('threshold_rule', '')}); elsewhere the call reads 'type not suggested'. Labels of TCGA "
              "tumours are glioma by collection.", "",
              "| source | tumour images called tumour | type shown | type right when shown |", "|---|---|---|---|"]
        L += [f"| {k} | {v['tumour_calls']} | {_pct(v['typed'])} | {_pct(v['type_right'])} |" for k, v in types.items()]
    pts = [(k, v["pointing"]) for k, v in (lo or {}).items() if v.get("pointing")]
    tol = loso.POINTING_TOLERANCE_PX
    if card.get("localisation") or pts:
        L += ["", "## Localisation (Grad-CAM pointing game)",
              "On tumour slices with a FLAIR abnormality mask that the model called tumour (a tumour class on "
              f"top): is the heatmap's peak inside the mask (or within {tol} px of it)?", "",
              f"| model / images | slices | not called tumour | peak inside mask | within {tol} px |",
              "|---|---|---|---|---|"]
        rows = ([("shipped model, test split", card["localisation"])] if card.get("localisation") else []) + \
            [(f"trained without {k}", v) for k, v in pts]
        for name, v in rows:
            L.append(f"| {name} | {v['slices']} | {v['no_tumour_call']} | {_pct(v['inside_mask'])} | "
                     f"{_pct(v[f'within_{tol}px'])} |")
    return L
