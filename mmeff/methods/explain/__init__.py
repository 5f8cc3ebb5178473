"""Explainability-guided compression: the method and its relevance mapper (``method``) and the mapper's trainer
(``train``; never imported by ``wrap``)."""

from mmeff.methods.explain.method import Explain, ExplainConfig

__all__ = ["Explain", "ExplainConfig"]
