"""DyVTE: the method and its routers (``method``) and their trainer (``train``; never imported by ``wrap``)."""

from mmeff.methods.dyvte.method import DyVTE, DyVTEConfig

__all__ = ["DyVTE", "DyVTEConfig"]
