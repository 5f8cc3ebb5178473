"""VFlowOpt: the method (``method``), its token-budget arithmetic (``budget``), its tuner (``tune``, needs
optuna; never imported by ``wrap``), and a vision-side stage that drops merge units inside Qwen2-VL's tower
(``vit``; ours, not in the paper)."""

from mmeff.methods.vflowopt.method import VFlowOpt, VFlowOptConfig
from mmeff.methods.vflowopt.vit import VFlowOptViT, VFlowOptViTConfig

__all__ = ["VFlowOpt", "VFlowOptConfig", "VFlowOptViT", "VFlowOptViTConfig"]
