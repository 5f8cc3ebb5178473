"""Attention received per key, without materialising the whole attention matrix at once.

``received_attention`` dispatches to the Triton kernel on CUDA when one is available and to the torch
reference otherwise.
"""

from mmeff.kernels.attention_stats.reference import attention_probs, received_attention

__all__ = ["attention_probs", "received_attention"]
