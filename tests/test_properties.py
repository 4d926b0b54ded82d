"""Property tests (hypothesis): whatever the budget, layer, batch and padding, text tokens are never
dropped, kept indices are unique, sorted and inside the vision span, and the count is the budget."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune import tokenops
from graphprune.tools.zoo import llava_example


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
