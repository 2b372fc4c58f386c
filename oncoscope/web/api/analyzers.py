"""``/analyzers``: what the installation can analyse."""

from __future__ import annotations

from ...analyzers import registry
from .core import api


@api("/analyzers", "GET", summary="List analyzers with a summary of their validation", tag="analyzers",
     response="AnalyzerList")
def list_analyzers():
    return {"items": [dict(registry.get(a).describe(), validation_summary=registry.get(a).validation_summary())
                      for a in registry.available()]}
