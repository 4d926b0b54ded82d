"""ToMe on LLaVA-NeXT (CLIP, with CLS) and LLaVA-OneVision (SigLIP, no CLS) anyres images: tome(positions='keep')
merges in place inside the encoder, crop by crop (each crop is one ViT sequence): a crop's surviving patches split
A/B as ToMe splits [CLS, survivors], its r best A -> B matches merge size-weighted into the B slot, never across
crops; merged-away patches are masked as keys in the later layers of their crop (proportional attention adds
log(size) of each key) and as padding in the LLM. `keep` / `r` count per crop.

Against tests/reference_vision_llava_next_tome.py (independent: the model's own encoder layers crop by crop, the
merge and masks by hand, the tokens laid out by the model's own pack_image_features, the pruned prompt run by
reference.lm_generate): which token merged into which, prefill logits (fp32, atol 1e-5) and 16 greedy tokens on
a left-padded batch of 2; a batch equals each sample alone."""
import pytest
import reference_vision_llava_next_tome as RT
import torch

from graphprune.passes.tome import bipartite_merge

STEPS = 16
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


@pytest.mark.parametrize("cls,r,keep", [(True, 3, None), (False, None, 4), (True, None, 2)])
def test_crop_merge_on_a_toy_tensor(cls, r, keep):
    """bipartite_merge with crops (CropOf) on three interleaved crops of one image, some tokens already merged
    away (invalid), unequal sizes: against reference_vision_llava_next_tome.crop_merge run crop by crop on the
    survivors: which token merged into which (validity and sizes), the merged values, every slot kept."""
    g = torch.Generator().manual_seed(11)
    v, d, heads = 23, 6, 2
    crop = torch.randint(0, 3, (v,), generator=g)
    valid = torch.rand(v, generator=g) > 0.2
    keys, hidden = torch.randn(1, 1, v, heads * 4, generator=g), torch.randn(1, 1, v, d, generator=g)
    sizes = torch.randint(1, 4, (1, 1, v), generator=g).float()
    crops = torch.stack([crop, torch.full_like(crop, int(cls))], -1)[None, None]
    out = bipartite_merge(k=None, protected=None, valid=valid[None, None], vision_pos=None, keys=keys, hidden=hidden,
                          sizes=sizes, r=r, keep=keep, layers_left=2, heads=heads, together=None, cls=False,
                          in_place=True, crops=crops)
    want_x, want_s, want_valid = hidden[0, 0].clone(), sizes[0, 0].clone(), valid.clone()
    merged_any = False
    for c in range(3):
        rows = [i for i in range(v) if crop[i] == c and valid[i]]     # token order is each crop's raster order
        count = RT.merges_now(len(rows), r, keep, 2)
        ref = RT.crop_merge(keys[0, 0, rows], hidden[0, 0, rows], sizes[0, 0, rows], cls, count, heads)
        assert len(ref["into"]) == count
        want_x[rows], want_s[rows] = ref["hidden"], ref["sizes"]
        for src in ref["into"]:
            want_valid[rows[src]] = False
        merged_any |= bool(ref["into"])
    assert merged_any
    assert out["picked"][0, 0].tolist() == list(range(v))
    assert torch.equal(out["valid"][0, 0], want_valid)
    torch.testing.assert_close(out["sizes"][0, 0], want_s)
    torch.testing.assert_close(out["values"][0, 0], want_x, atol=1e-6, rtol=1e-6)
    assert float(out["sizes"][0, 0][out["valid"][0, 0]].sum()) == float(sizes[0, 0][valid].sum())
