"""ZipVL: the method (``method``) and its mixed-precision cache layer."""

from mmeff.methods.zipvl.method import ZipVL, ZipVLConfig

__all__ = ["ZipVL", "ZipVLConfig"]
