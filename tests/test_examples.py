"""The examples run, and the custom pass selects what its definition says (checked by hand here)."""
import importlib.util
import os

import reference as R
import torch

from graphprune.tools.zoo import Example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_custom_pass_example(capsys):
    pruned, inputs = _load("custom_pass").main()
    assert "knorm(layer=2, keep=9)" in capsys.readouterr().out
    model = pruned.model

    def knorm(ctx):        # the method, by hand: L1 norm of layer-1 post-RoPE keys (heads concatenated)
        b, h, s, d = ctx["keys"].shape                            # layer K-1's cached keys
        keys = ctx["keys"].transpose(1, 2).reshape(b, s, h * d)
        vm = ctx["vision_mask"]
        score = keys.abs().sum(-1).masked_fill(~vm, float("-inf"))
        top = score.topk(9, -1).indices
        keep = (~vm).clone()
        keep.scatter_(1, top, True)
        return torch.stack([torch.nonzero(r)[:, 0] for r in keep])

    emb, am, pos, vm = R.llava_inputs(model, Example(**inputs))
    ref = R.lm_generate(model, emb, am, pos, select=knorm, select_layer=2, max_new_tokens=8, vision_mask=vm)
    out = pruned(**inputs)
    assert torch.equal(out.kept, ref["keep"])
    assert torch.equal(pruned.generate(**inputs, max_new_tokens=8, eos_token_id=[])[:, -8:], ref["tokens"])


def test_method_configs_expand_like_the_named_pipelines():
    """examples/mustdrop.toml is the "mustdrop" pipeline at keep=64; visiontrim.toml the vision stage."""
    import graphprune as gp
    toml = gp.as_passes(os.path.join(ROOT, "examples", "mustdrop.toml"))
    named = gp.as_passes("mustdrop", keep=64)
    assert [repr(p) for p in toml] == [repr(p) for p in named]
    vt = gp.as_passes(os.path.join(ROOT, "examples", "visiontrim.toml"))
    assert [repr(p) for p in vt] == [repr(p) for p in gp.as_passes("visiontrim", keep=64, dominant=48)]
