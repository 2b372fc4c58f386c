"""Registry of analyzers by id. Each analyzer is built once per process, lazily and thread-safely."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

from .base import Analyzer

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

# id -> (module, class name). Adding an analyzer = one line here + its module + its model folder.
#
# The table stays the one list on purpose, rather than each analyzer module registering itself
# where it is defined (timm's decorator): self-registration only happens once a module has been
# imported, so something would still have to import every analyzer module up front, and that
# import list would be this table again, in a less obvious place. As strings, the table lets this
# module import nothing but ``base``, and an analyzer module (and its ONNX sessions) loads only
# when that analyzer is first asked for.
_SPECS: dict[str, tuple[str, str]] = {
    "smear-differential": ("oncoscope.analyzers.smear_differential", "SmearDifferentialAnalyzer"),
    "smear-all": ("oncoscope.analyzers.smear_all", "SmearAllAnalyzer"),
    "bone-xray": ("oncoscope.analyzers.bone_xray", "BoneXrayAnalyzer"),
    "brain-mri": ("oncoscope.analyzers.brain_mri", "BrainMriAnalyzer"),
}

_instances: dict[str, Analyzer] = {}
_lock = threading.Lock()


class UnknownAnalyzer(KeyError):
    def __str__(self) -> str:
        return f"unknown analyzer {self.args[0]!r}; available: {', '.join(available())}"


def available() -> list[str]:
    """Ids of analyzers whose model folder ships a config."""
    return [i for i in _SPECS if (MODELS_DIR / i / "config.json").exists()]


def installed(analyzer_id: str) -> Analyzer | None:
    """The analyzer, or None when it is not installed (a case keeps its analyzer id after a model is removed)."""
    return get(analyzer_id) if analyzer_id in available() else None


def get(analyzer_id: str, model_dir: Path | None = None) -> Analyzer:
    if analyzer_id not in _SPECS:
        raise UnknownAnalyzer(analyzer_id)
    if model_dir is not None:  # explicit folder: a fresh instance (evaluation of candidate models)
        mod, cls = _SPECS[analyzer_id]
        return getattr(importlib.import_module(mod), cls)(Path(model_dir))
    inst = _instances.get(analyzer_id)
    if inst is None:
        with _lock:
            inst = _instances.get(analyzer_id)
            if inst is None:
                mod, cls = _SPECS[analyzer_id]
                inst = getattr(importlib.import_module(mod), cls)(MODELS_DIR / analyzer_id)
                _instances[analyzer_id] = inst
    return inst


def clear() -> None:
    with _lock:
        _instances.clear()
