"""REST API ``/api/v1``: thin JSON endpoints over the same store functions, object-level rules and
export services as the web pages. The OpenAPI 3.1 document is generated from the route
declarations (``@api(...)`` in ``core``), so code and document cannot drift apart.

``core``: the blueprint, ``@api`` and the answer encoding; ``guards``: bearer tokens and
Idempotency-Key replay; ``inputs``: request bodies, paging and the records a path names;
``schemas``, ``serializers``; one module per resource; ``docs``: the document and its page.
"""

from __future__ import annotations

# importing a resource module declares its routes (docs last: its routes follow theirs)
from . import analyzers, patients, cases, cells, exports, workflow, integration, docs
from .core import bp

__all__ = ["bp", "analyzers", "patients", "cases", "cells", "exports", "workflow", "integration", "docs"]
