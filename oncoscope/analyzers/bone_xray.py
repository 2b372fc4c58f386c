"""``bone-xray``: bone radiographs (cancer / normal).

A grayscale classifier served by the shared pipeline (:mod:`.classification`):
luminance, aspect-preserving pad and resize, calibrated probabilities,
*uncertain* / *out_of_domain* statuses and Grad-CAM. DICOM input is windowed by
the image loader, and a DICOM file of another modality is refused as out of
domain (:meth:`~.base.Analyzer.analyze`). Labels, thresholds and report wording
come from the model folder's ``config.json``.
"""

from __future__ import annotations

from .classification import ImageClassifierAnalyzer


class BoneXrayAnalyzer(ImageClassifierAnalyzer):
    id = "bone-xray"
