"""VFlowOpt: the method (``method``), its token-budget arithmetic (``budget``) and its tuner (``tune``, needs
optuna; never imported by ``wrap``)."""

from mmeff.methods.vflowopt.method import VFlowOpt, VFlowOptConfig

__all__ = ["VFlowOpt", "VFlowOptConfig"]
