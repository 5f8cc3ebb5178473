"""The coordinate core of :mod:`mmeff.engine.state`, pinned against brute-force references written as plain
per-sample, per-position Python loops.

Every case runs on a ragged, left-padded batch (3 samples, 9 positions, 0/2/4 padding tokens) whose keep masks
keep different numbers of slots per sample, so groups carry fill slots; second selections are made from a
first one and try to keep its fill slots. Pinned: ``select`` (slots, fill, ``order``, composition, ``n_new``),
``gather_seq`` (every tensor layout the pipeline gathers), ``restrict_mask`` (bool and additive masks, the
implicit causal mask, prefill and decode forms) and the ``State`` queries on groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from mmeff.engine.state import Group, State, gather_seq, identity_group, restrict_mask, select

B, N = 3, 9
PADS = (0, 2, 4)
CPU = torch.device("cpu")
MIN = torch.finfo(torch.float32).min


def _padding() -> torch.Tensor:
    """[B, N] long attention mask, zeros on the left."""
    mask = torch.ones(B, N, dtype=torch.long)
    for b, pad in enumerate(PADS):
        mask[b, :pad] = 0
    return mask


def _keep_among(gen: torch.Generator, allowed: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """[B, L] bool: ``counts[b]`` random slots among ``allowed[b]`` (different counts make the batch ragged)."""
    keep = torch.zeros_like(allowed)
    for b, n in enumerate(counts):
        slots = allowed[b].nonzero().flatten()
        keep[b, slots[torch.randperm(len(slots), generator=gen)[:n]]] = True
    return keep


def _keep_positions(g: Group, positions: torch.Tensor) -> torch.Tensor:
    """[B, L] bool over ``g``'s slots: keep each slot whose original position is marked in ``positions`` [B, N]
    — fill slots included, so such a mask also tries to keep invalid slots."""
    keep = torch.zeros_like(g.valid)
    for b in range(B):
        for s in range(g.index.shape[1]):
            keep[b, s] = bool(positions[b, g.index[b, s]])
    return keep


def _groups(seed: int) -> tuple[Group, Group, Group, torch.Tensor, torch.Tensor]:
    """(identity, g1 selected from it, g2 selected from g1, keep1, keep2); keep2 also asks for g1's fill slots."""
    gen = torch.Generator().manual_seed(seed)
    g0 = identity_group(B, N, CPU)
    keep1 = _keep_among(gen, g0.valid, (6, 3, 5))
    g1 = select(g0, keep1, 2)
    keep2 = _keep_among(gen, g1.valid, (2, 3, 4)) | ~g1.valid
    g2 = select(g1, keep2, 4)
    return g0, g1, g2, keep1, keep2


def _ref_select(prev: Group, keep: torch.Tensor) -> tuple[list[list[int]], list[list[bool]]]:
    """(order, valid) rows: kept valid slots plus the earliest dropped slots as fill, up to the longest row."""
    length = keep.shape[1]
    kept = [[j for j in range(length) if keep[b, j] and prev.valid[b, j]] for b in range(B)]
    width = max(len(k) for k in kept)
    orders = []
    for k in kept:
        dropped = [j for j in range(length) if j not in k]
        orders.append(sorted(k + dropped[: width - len(k)]))
    return orders, [[j in kept[b] for j in row] for b, row in enumerate(orders)]


def _kept_positions(g: Group) -> list[list[int]]:
    return [[int(p) for p, v in zip(g.index[b], g.valid[b]) if v] for b in range(B)]


# --- select -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_select_matches_loops(seed: int) -> None:
    g0, g1, g2, keep1, keep2 = _groups(seed)
    assert (keep2 & ~g1.valid).any()  # the second mask really asks for fill slots
    for prev, keep, g, layer in ((g0, keep1, g1, 2), (g1, keep2, g2, 4)):
        orders, valid = _ref_select(prev, keep)
        assert g.start_layer == layer
        assert g.order.tolist() == orders
        assert g.valid.tolist() == valid
        assert g.index.tolist() == [[int(prev.index[b, j]) for j in row] for b, row in enumerate(orders)]
        # the slots the pipeline holds are in original order: rows ascend, fill slots included
        assert all(row == sorted(set(row)) for row in g.index.tolist())
        # fill slots are never kept: valid counts are those of keep ∩ prev.valid
        assert g.valid.sum(1).tolist() == (keep & prev.valid).sum(1).tolist()
        width = int((keep & prev.valid).sum(1).max())
        given = select(prev, keep, layer, n_new=width)
        for a, b in ((given.index, g.index), (given.valid, g.valid), (given.order, g.order)):
            assert torch.equal(a, b)
    assert (~g1.valid).any() and (~g2.valid).any()  # ragged: both groups carry fill slots


@pytest.mark.parametrize("seed", range(4))
def test_select_composes_to_the_intersection(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = select(identity_group(B, N, CPU), _keep_among(gen, torch.ones(B, N, dtype=torch.bool), (8, 6, 7)), 1)
    # both selections chosen as sets of original positions, read through each group's slots
    first = torch.rand(B, N, generator=gen) < 0.7
    second = torch.rand(B, N, generator=gen) < 0.6
    g1 = select(base, _keep_positions(base, first), 2)
    k2 = _keep_positions(g1, second) | ~g1.valid
    g2 = select(g1, k2, 3)
    direct = select(base, _keep_positions(base, first & second), 3)
    expect = [[p for p in _kept_positions(base)[b] if first[b, p] and second[b, p]] for b in range(B)]
    assert _kept_positions(g2) == expect == _kept_positions(direct)
    assert g2.index.shape == direct.index.shape
    # orders chain: each group's index is its parent's index read through its order (what the scatter-back uses)
    assert torch.equal(torch.gather(torch.gather(base.index, 1, g1.order), 1, g2.order), g2.index)


# --- gather_seq ---------------------------------------------------------------------------------------------------


def _ref_gather(t: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """Explicit indexing: out[..., b, i, ...] = t[..., b or 0, order[b, i], ...]."""
    dim %= t.ndim
    lead = (slice(None),) * (dim - 1)
    out = torch.empty(*t.shape[: dim - 1], order.shape[0], order.shape[1], *t.shape[dim + 1 :], dtype=t.dtype)
    for b in range(order.shape[0]):
        src = b if t.shape[dim - 1] > 1 else 0
        for i in range(order.shape[1]):
            out[(*lead, b, i)] = t[(*lead, src, int(order[b, i]))]
    return out


@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        ((B, N, 4), 1),  # hidden states
        ((B, N), -1),  # position ids
        ((1, N), -1),  # position ids shared by the batch
        ((3, B, N), -1),  # M-RoPE position ids
        ((3, 1, N), -1),
        ((B, N, 4), -2),  # rotary cos / sin
        ((1, N, 4), -2),
        ((1, N, 4), 1),
        ((3, B, N, 4), -2),  # M-RoPE cos / sin
    ],
)
def test_gather_seq_matches_indexing(shape: tuple[int, ...], dim: int) -> None:
    _, g1, g2, _, _ = _groups(0)
    t = torch.arange(torch.Size(shape).numel()).reshape(shape)  # distinct values: a wrong element shows
    for order in (g1.order, g2.index):
        out = gather_seq(t, order, dim)
        assert out.shape[dim % t.ndim - 1] == B
        assert torch.equal(out, _ref_gather(t, order, dim))


# --- restrict_mask ----------------------------------------------------------------------------------------------


def _orig_allowed(pad: torch.Tensor, q_len: int, k_len: int, heads: int = 1) -> torch.Tensor:
    """[B, heads, q_len, k_len] bool in original coordinates: causal (queries are the last q_len positions) and
    padding; head 1 (if any) adds a sliding window of 3 so per-head patterns differ."""
    allowed = torch.zeros(B, heads, q_len, k_len, dtype=torch.bool)
    for b in range(B):
        for h in range(heads):
            for i in range(q_len):
                p = k_len - q_len + i
                for k in range(k_len):
                    allowed[b, h, i, k] = bool(pad[b, k]) and k <= p and (h == 0 or p - k < 3)
    return allowed


def _ref_restrict(
    allowed: torch.Tensor, q_index: torch.Tensor | None, k_index: torch.Tensor, k_valid: torch.Tensor
) -> torch.Tensor:
    """[B, heads, q, K] bool: the original entry for valid keys; a fill key only for its own slot as query."""
    heads, q = allowed.shape[1], (allowed.shape[2] if q_index is None else q_index.shape[1])
    out = torch.zeros(B, heads, q, k_index.shape[1], dtype=torch.bool)
    for b in range(B):
        for h in range(heads):
            for i in range(q):
                row = i if q_index is None else int(q_index[b, i])
                for j in range(k_index.shape[1]):
                    if k_valid[b, j]:
                        out[b, h, i, j] = bool(allowed[b if allowed.shape[0] > 1 else 0, h, row, k_index[b, j]])
                    else:
                        out[b, h, i, j] = q_index is not None and int(q_index[b, i]) == int(k_index[b, j])
    return out


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, MIN)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_restrict_mask_prefill_matches_loops(seed: int, heads: int) -> None:
    pad = _padding()
    allowed = _orig_allowed(pad, N, N, heads)
    for g in _groups(seed)[1:3]:
        n = g.index.shape[1]
        ref = _ref_restrict(allowed, g.index, g.index, g.valid)
        got = restrict_mask(allowed, g.index, g.index, g.valid, n, (g.index, g.index))
        assert got.dtype == torch.bool and torch.equal(got, ref)
        got_float = restrict_mask(_additive(allowed), g.index, g.index, g.valid, n, (g.index, g.index))
        assert got_float.dtype == torch.float32 and torch.equal(got_float, _additive(ref))
        # no row of a real token or of a fill slot is empty (an empty row would give NaN)
        real = torch.gather(pad.bool(), 1, g.index) | ~g.valid
        assert ref.any(-1)[real[:, None, :].expand(-1, heads, -1)].all()


def test_restrict_mask_broadcasts_a_batch_one_mask() -> None:
    _, g1, g2, _, _ = _groups(1)
    causal = torch.ones(N, N, dtype=torch.bool).tril()[None, None]  # no padding: one mask for the batch
    for g in (g1, g2):
        ref = _ref_restrict(causal, g.index, g.index, g.valid)
        args = (g.index, g.index, g.valid, g.index.shape[1], (g.index, g.index))
        assert torch.equal(restrict_mask(causal, *args), ref)
        assert torch.equal(restrict_mask(_additive(causal), *args), _additive(ref))


@pytest.mark.parametrize("seed", range(3))
def test_restrict_mask_implicit_causal(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g0 = identity_group(B, N, CPU)
    # same count per sample: no fill slots, the sorted slots are still a plain causal pattern
    full = select(g0, _keep_among(gen, g0.valid, (5, 5, 5)), 1)
    assert restrict_mask(None, full.index, full.index, full.valid, 5, (full.index, full.index)) is None
    causal = torch.ones(N, N, dtype=torch.bool).tril()[None, None]
    for g in _groups(seed)[1:3]:
        got = restrict_mask(None, g.index, g.index, g.valid, g.index.shape[1], (g.index, g.index))
        assert torch.equal(got, _ref_restrict(causal, g.index, g.index, g.valid))


def _decode_state(g: Group, decoded: int, step: int) -> State:
    visual = torch.zeros(B, N, dtype=torch.bool)
    st = State([[] for _ in range(B)], visual, visual.clone(), _padding(), N, [g], phase="decode")
    st.decoded, st.step_tokens = decoded, step
    return st


@pytest.mark.parametrize(("decoded", "step"), [(0, 1), (3, 1), (2, 3)])
def test_restrict_mask_decode_matches_loops(decoded: int, step: int) -> None:
    _, g1, g2, _, _ = _groups(2)
    total = N + decoded + step
    pad = torch.cat([_padding(), torch.ones(B, decoded + step, dtype=torch.long)], 1)
    allowed = _orig_allowed(pad, step, total)  # rows: the new tokens; columns: prompt then every decoded token
    for g in (g1, g2):
        q_pos, k_index, k_valid = _decode_state(g, decoded, step).decode_slots(g)
        ref = _ref_restrict(allowed, None, k_index, k_valid)  # decode queries are never fill: fill keys hidden
        got = restrict_mask(allowed, None, k_index, k_valid, step, (q_pos, k_index))
        assert torch.equal(got, ref)
        got_float = restrict_mask(_additive(allowed), None, k_index, k_valid, step, (q_pos, k_index))
        assert torch.equal(got_float, _additive(ref))
        implicit = restrict_mask(None, None, k_index, k_valid, step, (q_pos, k_index))
        causal = _orig_allowed(torch.ones(B, total, dtype=torch.long), step, total)
        assert torch.equal(implicit, _ref_restrict(causal, None, k_index, k_valid))


# --- State ------------------------------------------------------------------------------------------------------


def _visual_state(seed: int) -> State:
    """Image spans after the padding and one text token, each ending in a layout token; pruners drop only
    prunable slots, so the fill slots land on visual tokens (what the ``& valid`` of the queries guards)."""
    gen = torch.Generator().manual_seed(seed)
    visual = torch.zeros(B, N, dtype=torch.bool)
    layout = torch.zeros(B, N, dtype=torch.bool)
    for b, (pad, length) in enumerate(zip(PADS, (6, 5, 3))):
        visual[b, pad + 1 : pad + 1 + length] = True
        layout[b, pad + length] = True
    st = State([[] for _ in range(B)], visual, layout, _padding(), N, [identity_group(B, N, CPU)])
    for layer, counts in ((2, (1, 3, 0)), (2, (1, 1, 0)), (5, (0, 1, 0))):  # two selections at layer 2
        g = st.group
        prunable = torch.zeros_like(g.valid)
        for b in range(B):
            for s in range(g.index.shape[1]):
                p = int(g.index[b, s])
                prunable[b, s] = bool(g.valid[b, s] and visual[b, p] and not layout[b, p])
        st.groups.append(select(g, ~prunable | _keep_among(gen, prunable, counts), layer))
    return st


def _ref_group_for(st: State, layer: int) -> Group:
    chosen = st.groups[0]
    for g in st.groups:
        if g.start_layer <= layer:
            chosen = g
    return chosen


@pytest.mark.parametrize("seed", range(3))
def test_state_group_queries_match_loops(seed: int) -> None:
    st = _visual_state(seed)
    starts = [0, 2, 2, 5]
    assert [g.start_layer for g in st.groups] == starts
    for layer, expect in enumerate([0, 0, 2, 2, 2, 3, 3]):  # the later of two groups at one layer wins
        assert st.group_for(layer) is st.groups[expect]
    assert any((torch.gather(st.visual, 1, g.index) & ~g.valid).any() for g in st.groups)  # fill on visual
    for g in st.groups:
        vis = torch.zeros_like(g.valid)
        prun = torch.zeros_like(g.valid)
        for b in range(B):
            for s in range(g.index.shape[1]):
                p = int(g.index[b, s])
                vis[b, s] = bool(st.visual[b, p] and g.valid[b, s])
                prun[b, s] = bool(st.visual[b, p] and not st.layout[b, p] and g.valid[b, s])
        assert torch.equal(st.visual_in_group(g), vis)
        assert torch.equal(st.prunable_in_group(g), prun)
    kept = st.kept_visual_per_layer(7)
    ref = [
        [sum(bool(st.visual[b, p]) for p in _kept_positions(_ref_group_for(st, layer))[b]) for layer in range(7)]
        for b in range(B)
    ]
    assert kept.tolist() == ref
    assert len({tuple(row) for row in zip(*ref)}) > 2  # the count really changes across the layers


@pytest.mark.parametrize(("decoded", "step"), [(0, 1), (4, 1), (2, 3)])
def test_state_key_positions_match_loops(decoded: int, step: int) -> None:
    st = _visual_state(0)
    for layer in range(7):
        g = _ref_group_for(st, layer)
        index, valid = st.key_positions(layer)  # prefill: the group's own slots
        assert torch.equal(index, g.index) and torch.equal(valid, g.valid)
    st.phase, st.decoded, st.step_tokens = "decode", decoded, step
    new = list(range(N, N + decoded + step))
    for layer in range(7):
        g = _ref_group_for(st, layer)
        index, valid = st.key_positions(layer)
        assert index.tolist() == [g.index[b].tolist() + new for b in range(B)]
        assert valid.tolist() == [g.valid[b].tolist() + [True] * len(new) for b in range(B)]
        q_pos, k_index, k_valid = st.decode_slots(g)
        assert q_pos.tolist() == [new[-step:]] * B
        assert torch.equal(k_index, index) and torch.equal(k_valid, valid)
        other = torch.rand(g.valid.shape, generator=torch.Generator().manual_seed(layer)) < 0.5
        assert st.decode_slots(g, other)[2].tolist() == [other[b].tolist() + [True] * len(new) for b in range(B)]
