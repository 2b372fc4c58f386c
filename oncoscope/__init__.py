"""Oncoscope: decision support for cancer screening in medical images."""

__version__ = "0.1.0"
