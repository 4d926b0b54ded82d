"""Property tests (hypothesis): whatever the budget, layer, batch and padding, text tokens are never
dropped, kept indices are unique, sorted and inside the vision span, and the count is the budget."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune import tokenops
from graphprune.tools.zoo import llava_example


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h_kv=st.integers(1, 2), s=st.integers(2, 9), mask_dims=st.sampled_from([0, 2, 3, 4]),
       bool_mask=st.booleans(), data=st.data())
def test_attention_rows_equal_softmax_attention(b, h_kv, s, mask_dims, bool_mask, data):
    """A few query rows of head-averaged attention, for every mask shape SDPA broadcasts ((S, S),
    (H, S, S), (B, 1, S, S)), boolean or additive, or causal: softmax(q k^T scale + mask) by hand."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    h, d = 2 * h_kv, 4
    q, k = torch.randn(b, h, s, d, generator=g), torch.randn(b, h_kv, s, d, generator=g)
    shape = {0: (s, s), 2: (s, s), 3: (h, s, s), 4: (b, 1, s, s)}[mask_dims]
    allowed = (torch.rand(shape, generator=g) > 0.3) | torch.eye(s, dtype=torch.bool)   # each row attends somewhere
    if mask_dims == 0:
        allowed, mask = torch.ones(s, s, dtype=torch.bool).tril(), None
    else:
        mask = allowed if bool_mask else torch.zeros(shape).masked_fill(~allowed, -1e4)
    queries = torch.tensor(data.draw(st.lists(st.integers(0, s - 1), min_size=1, max_size=3))).expand(b, -1)
    keys = torch.arange(s).reshape(1, 1, s).expand(b, 1, s)
    got = tokenops.attention_rows(q, k, mask, None, mask is None, queries, keys)
    logits = (q @ k.repeat_interleave(h // h_kv, 1).transpose(-1, -2)) / d ** 0.5
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(1)          # (B, S, S)
    want = probs.gather(1, queries[..., None].expand(b, queries.shape[1], s))[:, :, None, :]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 3), v=st.integers(1, 12), before=st.integers(0, 6),
       between=st.integers(0, 3), after=st.integers(1, 6), data=st.data())
def test_select_topk_properties(b, n, v, before, between, after, data):
    k = data.draw(st.integers(1, v))
    starts = [before + i * (v + between) for i in range(n)]
    s = starts[-1] + v + after
    vision_pos = torch.tensor([[list(range(p, p + v)) for p in starts]] * b)
    scores = torch.randn(b, n, v, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    seq = torch.arange(s).expand(b, s)
    keep, new_pos, picked = tokenops.select_topk(scores, vision_pos, seq, k)[:3]
    vis = set(vision_pos[0].flatten().tolist())
    for row in range(b):
        kept = keep[row].tolist()
        assert kept == sorted(set(kept))                                  # unique, ascending
        assert set(range(s)) - vis <= set(kept)                           # text never dropped
        chosen = [i for i in kept if i in vis]
        assert len(chosen) == n * k                                       # budget per image
        for img, p in enumerate(starts):
            mine = [i for i in chosen if p <= i < p + v]
            assert len(mine) == k
            top = scores[row, img].topk(k).indices.sort().values + p
            assert mine == top.tolist()
        assert keep[row][new_pos[row].flatten()].tolist() == chosen       # new positions point at them


@settings(max_examples=12, deadline=None)
@given(layer=st.integers(1, 3), keep=st.integers(1, 36), pad=st.integers(0, 5), method=st.sampled_from(["fastv", "cls_topk"]))
def test_pruned_model_properties(llava, layer, keep, pad, method):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, pad), seed=pad)
    opts = {"keep": keep} | ({"layer": layer} if method == "fastv" else {})
    out = gp.prune(model, method, program=program, **opts)(**ex.as_kwargs())
    img = model.config.image_token_id
    for b in range(2):
        kept = out.kept[b]
        assert torch.equal(kept, kept.unique(sorted=True))
        real = torch.nonzero(ex.attention_mask[b])[:, 0]
        text = real[ex.input_ids[b, real] != img]
        assert torch.isin(text, kept).all()
        vision = kept[ex.input_ids[b, kept] == img]
        assert len(vision) == keep
        span = torch.nonzero(ex.input_ids[b] == img)[:, 0]
        assert torch.isin(vision, span).all()
