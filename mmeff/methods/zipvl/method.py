"""ZipVL (He et al., arXiv 2410.08584 v1): dynamic per-layer token sparsity for prefill attention plus a
mixed-precision KV cache, with ZipCache's (arXiv 2405.14256) normalized attention and probe queries.

Per decoder layer, at prefill (our reading of the paper; items marked * were not confirmed from its text):

1. *Probe queries*: ``probe_ratio`` (10%*) of the real prompt rows, ``recent_share`` (half*) of them the most
   recent rows and the rest drawn at random (seeded). Their attention is computed by
   :func:`mmeff.kernels.probe_scores.probe_scores` (fused kernel on CUDA) beside, not instead of, the layer's
   SDPA, so no keys x keys matrix is ever built.
2. *Normalized score* of key j: accumulated probe attention (mean over heads) / number of probes that see j.
3. *Dynamic ratio*: among the candidate keys (every real token, or only visual ones with ``scope="visual"``),
   keep the smallest set reaching ``tau`` of the candidates' mass (:func:`important_set`:
   ``p = min{p : sum_{j<=p} a_sorted(j) >= tau * sum(a)}``), ``ratio_mass`` choosing ``a``:
   ``"normalized"`` (default; our reference notes' reading: the normalized scores count and rank) or
   ``"accumulated"`` (the paper's equation as a review quotes it, ``>= tau * n`` over accumulated attention,
   whose total is the number of query rows: ``p`` counted on the accumulated probe attention, the ``p``
   tokens then picked by normalized score). The recent probe window (the question's end, whose last row gives
   the next-token logits) is always kept*, and so is every real non-candidate.
4. *Sparse prefill attention* over the important keys, through SDPA on the gathered tokens (causal in original
   positions). ``sparse_queries="important"`` (default; the paper's "attention among the important tokens",
   our reading of what the other rows get): only important query rows attend, the others' attention output
   is zero*, so their hidden state goes on through the residual stream and the MLP (they still reach the KV
   cache). ``"all"`` (ours): every query row attends to the important keys (a row that sees none gets zero).
5. *Mixed-precision cache*: important tokens at ``hi_bits`` (4), the rest at ``lo_bits`` (2) — ZipCache's
   widths*; asymmetric quantization by ``quantizer`` (:func:`mmeff.kernels.kv_quant.quantize_key_value`):
   ``"zipcache"`` (default; the released ZipCache code's demo setting: keys per channel over the whole part,
   values channel-separable token-wise — per-channel ``sqrt(max|v|)`` normalisation over the block, then one
   scale/offset per token over all heads), ``"cst"`` (channel-separable token-wise keys too) or ``"kivi"``
   (ours before: keys per channel over groups of ``group_size`` tokens, values per token over groups of
   ``group_size`` channels). Decoded tokens stay in full
   precision until ``recompress_every`` (100*) of them have accumulated; the decode queries' attention to them
   (normalized the same way) then splits them by the same ``tau`` rule and they are quantized as one block.
6. *Decode attention* reads the cache as stored: per quantized part, a fused kernel unpacks and dequantizes the
   codes in registers inside a split-K online softmax (:mod:`mmeff.kernels.quant_attention`); the parts' and
   the full-precision buffer's (out, log-sum-exp) partials merge exactly. No dequantized copy of the layer is
   built (``fused_decode=False`` builds it, then runs SDPA: the slow reference).

``bits = 16`` stores a set unquantized; with ``tau = 1`` and 16 bits the model is unchanged (tested).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mmeff.config import MethodConfig
from mmeff.engine.attention import AttentionCall
from mmeff.engine.cache import SlotLayer
from mmeff.engine.method import Method, Point, register_method
from mmeff.engine.ranking import inverse_permutation, true_positions
from mmeff.engine.state import Group, State, restrict_mask, select
from mmeff.errors import ConfigError
from mmeff.kernels.attention_stats import received_attention
from mmeff.kernels.kv_quant import (
    QUANTIZERS,
    QuantizedTensor,
    Quantizer,
    block_scales,
    gather_tokens,
    quantize_key_value,
    value_group,
)
from mmeff.kernels.kv_quant.reference import SUPPORTED_BITS
from mmeff.kernels.probe_scores import normalized_scores, probe_scores
from mmeff.kernels.quant_attention import Segment, decode_attention


@dataclass(frozen=True)
class ZipVLConfig(MethodConfig):
    method = "zipvl"
    tau: float = 0.975
    probe_ratio: float = 0.1
    recent_share: float = 0.5
    scope: Literal["all", "visual"] = "all"
    start_layer: int = 0  # layers before it stay dense, their cache at hi_bits
    ratio_mass: Literal["normalized", "accumulated"] = "normalized"  # what counts the kept share (step 3)
    sparse_prefill: bool = True
    sparse_queries: Literal["important", "all"] = "important"  # which query rows attend in the sparse prefill
    hi_bits: int = 4
    lo_bits: int = 2
    quantizer: Quantizer = "zipcache"
    group_size: int = 32  # "kivi": the quantization group; "zipcache": the key tile of the packed rows
    recompress_every: int = 100
    fused_decode: bool = True
    seed: int = 0


# -- the ratio rule and the probes -------------------------------------------------------------------------------

def _by_score(scores: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamped scores, candidate order by descending score, ties towards the earlier position)."""
    s = scores.float().masked_fill(~candidates, 0.0).clamp_min(0.0)
    return s, torch.sort(s.masked_fill(~candidates, -1.0), dim=1, descending=True, stable=True).indices


def important_set(
    scores: torch.Tensor, candidates: torch.Tensor, tau: float, mass: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, L] bool: per row, the ``p`` candidates of highest ``scores`` (ties towards the earlier position), ``p``
    the smallest count whose mass reaches ``tau`` of the candidates' total (ZipVL's ratio rule,
    ``p = min{p : sum_{j<=p} a_sorted(j) >= tau * sum_j a_j}``). ``a`` is ``scores`` itself, or ``mass`` [B, L]
    (ZipVL's accumulated attention, sorted on its own) when given. ``tau >= 1`` or no mass: every candidate."""
    s, order = _by_score(scores, candidates)
    a, a_order = (s, order) if mass is None else _by_score(mass, candidates)
    n_cand = candidates.sum(1)
    cum = torch.gather(a, 1, a_order).cumsum(1)
    total = cum[:, -1:]
    n_keep = (cum < tau * total).sum(1) + 1
    full = (total[:, 0] <= 0) | (tau >= 1.0)
    n_keep = torch.where(full, n_cand, torch.minimum(n_keep, n_cand))
    rank = inverse_permutation(order)
    return candidates & (rank < n_keep[:, None])


def choose_probes(
    real: torch.Tensor, ratio: float, recent_share: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probe mask, recent-window mask), [B, L] bool each: ``ceil(ratio * n)`` of each row's ``n`` real slots,
    ``recent_share`` of them the last real slots, the others drawn uniformly (``generator``, on ``real``'s
    device) from the rest. Vectorised over the batch, so it never waits for the GPU."""
    n = real.sum(1).double()
    n_probe = torch.minimum(torch.ceil(ratio * n).clamp_min(1.0), n)
    n_recent = torch.minimum(torch.round(n_probe * recent_share).clamp_min(1.0), n_probe)
    from_end = real.flip(1).cumsum(1).flip(1)  # real slots at or after each slot
    recent = real & (from_end <= n_recent[:, None])
    rest = real & ~recent
    priority = torch.rand(real.shape, generator=generator, device=real.device).masked_fill(~rest, 2.0)
    picked = rest & (inverse_permutation(priority.argsort(1)) < (n_probe - n_recent)[:, None])
    return picked | recent, recent


# -- the mixed-precision cache -----------------------------------------------------------------------------------
@dataclass
class _Part:
    """One precision class of a block: the tokens' places in the block (padding -> the block's dummy slot)."""

    index: torch.Tensor  # [B, M] int32
    keys: QuantizedTensor
    values: QuantizedTensor

    def tensors(self) -> list[torch.Tensor]:
        """Everything the part holds; ZipCache's channel normalisers are shared with the block's other part."""
        return [self.index, *self.keys.tensors(), *self.values.tensors()]


@dataclass
class _Block:
    length: int
    parts: list[_Part]


class ZipVLCacheLayer(SlotLayer):
    """A cache layer holding quantized blocks (important tokens at ``hi_bits``, the rest at ``lo_bits``)
    followed by a full-precision buffer of the newest decoded tokens (``self.keys`` / ``self.values``).

    Once blocks exist, ``update`` returns the buffer only: the layer's attention is computed by the ZipVL
    decode hook through :meth:`attend`, which reads the blocks as stored (``full`` materialises the whole
    layer, for the slow reference). ``nbytes`` counts the packed codes, scales, offsets, channel normalisers
    (once per block: its parts share them), token indices and the buffer — what the layer really holds.
    """

    def __init__(self, config: ZipVLConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks: list[_Block] = []
        self.n_quantized = 0
        # [B, capacity >= buffer]: decode attention received by the buffered tokens, and how many rows saw them
        self.score_acc: torch.Tensor | None = None
        self.score_cnt: torch.Tensor | None = None

    # length bookkeeping: the buffer is self.keys, the blocks come before it
    def stored_length(self) -> int:
        buffered = self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0
        return self.n_quantized + buffered

    def get_seq_length(self) -> int:
        stored = self.stored_length()
        return stored + self.removed if stored or self.removed else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:  # prefill: held in full precision until the hook decides importance
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        buffered = self.keys.shape[-2]
        if buffered >= self.config.recompress_every and self.score_acc is not None and self.blocks:
            acc, cnt = self.buffer_scores()
            mass = acc if self.config.ratio_mass == "accumulated" else None
            self.compress(important_set(normalized_scores(acc, cnt), torch.ones_like(acc, dtype=torch.bool),
                                        self.config.tau, mass))
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        buffered = self.keys.shape[-2]
        if self.blocks and (self.score_acc is None or self.score_acc.shape[1] < buffered):
            # decode: score the new tokens; room for a whole recompression period, so no per-step allocation
            size = max(buffered, self.config.recompress_every + 1)
            scores = key_states.new_zeros(2, key_states.shape[0], size, dtype=torch.float32)
            if self.score_acc is not None:
                old = self.score_acc.shape[1]
                scores[0, :, :old], scores[1, :, :old] = self.score_acc, self.score_cnt
            self.score_acc, self.score_cnt = scores[0], scores[1]
        return self.keys, self.values

    def buffer_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(accumulated attention, row count) [B, buffer] of the buffered tokens (views of the storage)."""
        n = self.keys.shape[-2]
        return self.score_acc[:, :n], self.score_cnt[:, :n]

    def compress(self, important: torch.Tensor) -> None:
        """Quantize the whole buffer as one block: ``important`` [B, buffer] at hi_bits, the rest at lo_bits."""
        c = self.config
        k, v = self.keys, self.values
        length = k.shape[-2]
        if c.quantizer == "kivi":
            value_group(c.group_size, k.shape[-1])  # fail early with a clear message
        parts = []
        sets = ((c.hi_bits, important), (c.lo_bits, ~important))
        sizes = torch.stack([m.sum(1).max() for _, m in sets]).tolist()  # one host read for both parts
        quantized = any(bits != 16 and m for (bits, _), m in zip(sets, sizes))
        # ZipCache's channel normalisers come from the whole block, before the split into precision classes
        scales = block_scales(k, v, c.quantizer) if quantized else (None, None)
        for (bits, members), m in zip(sets, sizes):
            if m == 0:
                continue
            index, valid = true_positions(members, m)
            # padding entries repeat a member of the same set (the ranges stay the set's) and land in the dummy slot
            last = torch.gather(index, 1, (valid.sum(1, keepdim=True) - 1).clamp_min(0))
            gather_at = torch.where(valid, index, last)
            parts.append(_Part(
                torch.where(valid, index, length).to(torch.int32),
                *quantize_key_value(k, v, bits, c.group_size, c.quantizer, gather_at, scales),
            ))
        self.blocks.append(_Block(length, parts))
        self.n_quantized += length
        # fresh empty buffers: a [..., :0, :] view would keep the full-precision storage alive
        self.keys, self.values = k.new_empty(*k.shape[:-2], 0, k.shape[-1]), v.new_empty(*v.shape[:-2], 0, v.shape[-1])
        self.score_acc = self.score_cnt = None

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token, dequantized, in stored order: [B, Hkv, stored, D] keys and values."""
        if not self.blocks:
            return self.keys, self.values
        ks, vs = [], []
        for block in self.blocks:
            b, h, _, d = self.keys.shape
            kb = self.keys.new_zeros(b, h, block.length + 1, d)
            vb = self.values.new_zeros(b, h, block.length + 1, d)
            for part in block.parts:
                idx = part.index.long()[:, None, :, None].expand(b, h, part.index.shape[1], d)
                kb.scatter_(2, idx, part.keys.dequantize().to(kb.dtype))
                vb.scatter_(2, idx, part.values.dequantize().to(vb.dtype))
            ks.append(kb[..., : block.length, :])
            vs.append(vb[..., : block.length, :])
        return torch.cat([*ks, self.keys], -2), torch.cat([*vs, self.values], -2)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        """Decode: attention [B, q, H, d] of this step's queries over the blocks and the buffer (``call.key`` /
        ``call.value`` are the buffer, ``call.mask`` covers every stored slot); also scores the buffer."""
        q = call.query
        mask = call.mask
        if not self.config.fused_decode or q.shape[2] != 1 or (mask is not None and mask.shape[1] != 1):
            return self._attend_materialised(call)
        bias = None
        if mask is not None:
            row = mask[:, 0, -1, :]
            bias = torch.where(row, 0.0, float("-inf")) if row.dtype == torch.bool else row.float()
        parts, start = [], 0
        for block in self.blocks:
            block_bias = None if bias is None else bias[:, start : start + block.length]
            parts += [Segment(p.keys, p.values, p.index, block.length, block_bias) for p in block.parts]
            start += block.length
        buf_bias = None if bias is None else bias[:, start:]
        out, probs = decode_attention(q[:, :, 0], parts, self.keys, self.values, buf_bias, call.scaling)
        if self.score_acc is not None:  # the buffered tokens' probabilities under the whole layer's softmax
            acc, cnt = self.buffer_scores()
            acc += probs.mean(1)
            cnt += 1.0
        return out[:, None]

    def _attend_materialised(self, call: AttentionCall) -> torch.Tensor:
        """The slow reference (and the path for several query rows): dequantize the layer, then SDPA."""
        k, v = self.full()
        if self.score_acc is not None:
            acc, cnt = self.buffer_scores()
            nbuf = acc.shape[1]
            q = call.query.shape[2]
            rows = received_attention(call.query, k, call.mask, call.scaling) * q  # summed over rows
            acc += rows[:, -nbuf:]
            # row r (0-based among this step's q) sees buffered token j iff j <= nbuf - q + r
            seen = torch.arange(nbuf, device=rows.device)[:, None] <= torch.arange(nbuf - q, nbuf, device=rows.device)
            cnt += seen.sum(1).float()[None, :]
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](call.module, call.query, k, v, call.mask, scaling=call.scaling,
                                                 dropout=0.0)
        return out

    def nbytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        held = {id(t): t for block in self.blocks for p in block.parts for t in p.tensors()}  # shared: once
        held[id(self.keys)], held[id(self.values)] = self.keys, self.values
        return sum(t.numel() * t.element_size() for t in held.values())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("zipvl: the quantized cache cannot be cropped (assisted generation)")

    def reset(self) -> None:
        self.blocks, self.n_quantized = [], 0
        self.score_acc = self.score_cnt = None
        super().reset()


# -- the attention hooks -----------------------------------------------------------------------------------------
class _Prefill:
    """Importance from the probe queries, then (maybe) sparse attention, and the cache's precision split."""

    def __init__(self, method: ZipVL, layer: int, state: State) -> None:
        self.method, self.layer, self.state = method, layer, state

    def replace(self, call: AttentionCall) -> torch.Tensor | None:
        c, st = self.method.config, self.state
        g = st.group
        real = g.valid.clone()
        if st.attention_mask is not None:
            real &= torch.gather(st.attention_mask.bool().to(real.device), 1, g.index)
        if self.layer < c.start_layer:
            important = real.clone()
            recent = torch.zeros_like(real)
        else:
            important, recent = self.method.importance(call, st, g, real, self.layer)
        cache = self.method.layers.get(self.layer)
        if cache is not None and cache.stored_length() == call.key.shape[2] and not cache.blocks:
            cache.compress(important.to(call.key.device))
        self.method.record(self.state, self.layer, important, real)
        if not c.sparse_prefill:
            return None
        keep = important | recent
        counts = keep.sum(1)
        dense, longest, shortest = torch.stack([(important | ~real).all(), counts.max(), counts.min()]).tolist()
        if dense:
            return None
        if c.sparse_queries == "all":
            return keys_only_attention(call, keep, g, longest)
        return sparse_attention(call, keep, g, longest, longest != shortest)


class _Decode:
    """Decode: the layer's attention read from the quantized cache (and the buffer's recompression scores)."""

    def __init__(self, cache: ZipVLCacheLayer) -> None:
        self.cache = cache

    def replace(self, call: AttentionCall) -> torch.Tensor:
        return self.cache.attend(call)


def sparse_attention(call: AttentionCall, keep: torch.Tensor, g: Group, longest: int, ragged: bool) -> torch.Tensor:
    """Attention among the ``keep`` [B, L] slots only (causal in original positions, the layer's mask
    gathered), through SDPA on the gathered tokens; rows of the other slots are zero. [B, L, H, d].
    ``longest`` / ``ragged``: the largest kept count and whether the counts differ (read by the caller)."""
    b, _h, n, _d = call.query.shape
    slots = Group(0, torch.arange(n, device=keep.device).expand(b, n), torch.ones_like(keep))
    sub = select(slots, keep, 0, longest)  # ragged rows padded with distinct fill slots
    order, valid = sub.order, sub.valid
    if call.mask is None and not ragged:  # still SDPA's causal pattern over the sorted kept slots
        mask = None
    else:
        orig = torch.gather(g.index, 1, order)
        mask = restrict_mask(call.mask, order, order, valid, order.shape[1], (orig, orig))
    q, k, v = (gather_tokens(t, order) for t in (call.query, call.key, call.value))
    out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](call.module, q, k, v, mask, scaling=call.scaling, dropout=0.0)
    full = out.new_zeros(b, n, out.shape[2], out.shape[3])
    if b == 1:  # one sample: every gathered row is a kept token
        return full.index_copy_(1, order[0], out)
    out = out * valid[:, :, None, None].to(out.dtype)
    return full.scatter_(1, order[:, :, None, None].expand_as(out), out)


def keys_only_attention(call: AttentionCall, keep: torch.Tensor, g: Group, longest: int) -> torch.Tensor:
    """``sparse_queries="all"`` (ours): every query row attends to the ``keep`` [B, L] keys only (causal in
    original positions, the layer's mask gathered), through SDPA on the gathered keys; a row that sees no kept
    key gets a zero output. [B, L, H, d]."""
    b, _h, n, _d = call.query.shape
    slots = Group(0, torch.arange(n, device=keep.device).expand(b, n), torch.ones_like(keep))
    sub = select(slots, keep, 0, longest)
    order, valid = sub.order, sub.valid
    mask = restrict_mask(call.mask, None, order, valid, n, (g.index, torch.gather(g.index, 1, order)), full=False)
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    empty = ~seen.any(-1, keepdim=True)  # [B, heads, L, 1]: rows before every kept key
    first = torch.zeros_like(seen)
    first[..., 0] = True
    if mask.dtype == torch.bool:
        mask = mask | (empty & first)  # any visible column keeps SDPA finite; the row is zeroed below
    else:
        mask = mask.masked_fill(empty & first, 0.0)
    k, v = (gather_tokens(t, order) for t in (call.key, call.value))
    out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](call.module, call.query, k, v, mask, scaling=call.scaling, dropout=0.0)
    live = ~empty.any(1)[:, :, 0]  # [B, L]
    return out * live[:, :, None, None].to(out.dtype)


@dataclass
class _Data:
    important: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> mean important share (device)


class ZipVL(Method):
    points = frozenset({Point.LAYER, Point.CACHE})
    Data = _Data
    # ZipVL computes the attention itself (sparse prefill, decode from the quantized cache): a method that
    # edits attention scores or probabilities in the same layers would be silently bypassed
    conflicts = frozenset({"var", "pai", "fia"})

    config: ZipVLConfig

    def __init__(self, config: ZipVLConfig, adapter: Any) -> None:
        super().__init__(config, adapter)
        # weak: the cache (held by generate or the caller) owns its layers; a strong reference here kept the
        # last prompt's whole cache alive after generation, and across wrap / unwrap
        self.layers: weakref.WeakValueDictionary[int, ZipVLCacheLayer] = weakref.WeakValueDictionary()

    def validate(self, n_layers: int) -> None:
        c = self.config
        if not 0.0 < c.tau <= 1.0:
            raise ConfigError(f"zipvl: tau must be in (0, 1], got {c.tau}")
        if not 0.0 < c.probe_ratio <= 1.0 or not 0.0 <= c.recent_share <= 1.0:
            raise ConfigError(f"zipvl: probe_ratio must be in (0, 1] and recent_share in [0, 1], got "
                              f"{c.probe_ratio}, {c.recent_share}")
        for name in ("hi_bits", "lo_bits"):
            if getattr(c, name) not in (*SUPPORTED_BITS, 16):
                raise ConfigError(f"zipvl: {name} must be one of {(*SUPPORTED_BITS, 16)}, got {getattr(c, name)}")
        if c.lo_bits > c.hi_bits:
            raise ConfigError(f"zipvl: lo_bits ({c.lo_bits}) must not exceed hi_bits ({c.hi_bits})")
        if c.group_size < 4 or c.group_size & (c.group_size - 1):
            raise ConfigError(f"zipvl: group_size must be a power of two >= 4, got {c.group_size}")
        if c.recompress_every < 1 or not 0 <= c.start_layer <= n_layers:
            raise ConfigError(f"zipvl: recompress_every must be >= 1 and start_layer in [0, {n_layers}]")
        if c.scope not in ("all", "visual"):
            raise ConfigError(f"zipvl: scope must be 'all' or 'visual', got {c.scope!r}")
        if c.quantizer not in QUANTIZERS:
            raise ConfigError(f"zipvl: quantizer must be one of {QUANTIZERS}, got {c.quantizer!r}")
        if c.ratio_mass not in ("normalized", "accumulated"):
            raise ConfigError(f"zipvl: ratio_mass must be 'normalized' or 'accumulated', got {c.ratio_mass!r}")
        if c.sparse_queries not in ("important", "all"):
            raise ConfigError(f"zipvl: sparse_queries must be 'important' or 'all', got {c.sparse_queries!r}")

    def begin(self, state: State, inputs: dict[str, Any]) -> None:
        self.layers = weakref.WeakValueDictionary()  # cache_layer() fills it at this prefill, if a cache is in use

    def cache_layer(self, layer: int) -> ZipVLCacheLayer:
        obj = ZipVLCacheLayer(self.config)
        self.layers[layer] = obj
        return obj

    def attention_hooks(self, layer: int, state: State) -> list[Any]:
        if state.phase == "prefill":
            return [_Prefill(self, layer, state)]
        cache = self.layers.get(layer)
        return [_Decode(cache)] if cache is not None and cache.blocks else []

    def importance(
        self, call: AttentionCall, st: State, g: Group, real: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(important [B, L], recent probe window [B, L]) of this layer's slots."""
        c = self.config
        gen = torch.Generator(device=real.device).manual_seed(c.seed * 100_003 + layer)
        probes, recent = choose_probes(real, c.probe_ratio, c.recent_share, gen)
        pos, weight = true_positions(probes)
        query = gather_tokens(call.query, pos)
        acc, count = probe_scores(query, call.key, pos, weight.float(), real, call.scaling)
        cand = real if c.scope == "all" else real & st.visual_in_group(g)
        mass = acc if c.ratio_mass == "accumulated" else None
        important = important_set(normalized_scores(acc, count), cand, c.tau, mass)
        return important | recent | (real & ~cand), recent

    def record(self, state: State, layer: int, important: torch.Tensor, real: torch.Tensor) -> None:
        frac = (important & real).sum(1).float() / real.sum(1).clamp_min(1).float()
        self.data(state).important[layer] = frac.mean()  # read on the host only when stats are asked for

    def stats(self, state: State) -> dict[str, Any]:
        """Important-token ratio per layer and its mean over layers, for the last prefill."""
        important = self.data(state).important
        if not important:
            return {}
        ratios = torch.stack([important[i] for i in sorted(important)])
        return {"important_ratio_per_layer": ratios, "important_ratio": ratios.double().mean()}


register_method(ZipVLConfig, ZipVL)
