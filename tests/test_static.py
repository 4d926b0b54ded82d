"""Static shapes: the static-cache decode step, its compilation, and the CUDA-graph lint."""
import pytest
import torch

import graphprune as gp
from graphprune.errors import GraphVerificationError
from graphprune.rewrite.positions import layer_lengths
from graphprune.targets.lint import check_static
from graphprune.tools.zoo import llava_example

MUSTDROP = "mustdrop(keep=12, layers=(1, 2), gamma=0.0278, alpha=0.0235, tau=0.01, mode='{}'{})"
STATIC, EXACT = MUSTDROP.format("static", ", merge_capacity=30"), MUSTDROP.format("exact", "")


@pytest.mark.parametrize("spec", ["fastv(layer=2, keep=9)", STATIC, "vtw(layer=2)"])
def test_static_cache_decode_equals_dynamic(llava, spec):
    model, program = llava
    pruned = gp.prune(model, spec, program=program)
    ex = llava_example(model, batch=2, pad=(0, 3), seed=2)
    dynamic = pruned.generate(**ex.as_kwargs(), max_new_tokens=10, eos_token_id=[])
    lengths = pruned.report.kv_len_per_layer
    static = pruned.generate(**ex.as_kwargs(), max_new_tokens=10, eos_token_id=[], static_cache=True)
    assert torch.equal(dynamic, static)
    assert pruned.report.kv_len_per_layer == lengths          # per-layer lengths as before, not padded


def _step_inputs(pruned, ex):
    """Example inputs of the static decode step, built from a real prefill."""
    out = pruned(**ex.as_kwargs())
    gm = pruned._static_graph()
    args = {"inputs_embeds": pruned.family.embed(ex.input_ids[:, -1:]),
            "position_ids": out.positions.amax(-1, keepdim=True) + 1,
            "kv_write_pos": torch.tensor(out.cache.lengths())}
    if pruned.layer_positions:                     # compact positions: each layer's own decode position
        args["layer_positions"] = layer_lengths(out.cache)
    for i, c in enumerate(out.cache):
        pad = lambda x, d: torch.cat([x, x.new_zeros(*x.shape[:d], 4, *x.shape[d + 1:])], d)  # noqa: E731
        args[f"past_{2 * i}"], args[f"past_{2 * i + 1}"] = pad(c.keys, 2), pad(c.values, 2)
        args[f"kv_mask_{i}"] = pad(c.mask, 1)
    return gm, args


def test_static_decode_step_is_cuda_graph_safe_and_keeps_its_shapes(llava):
    model, program = llava
    pruned = gp.prune(model, STATIC, program=program)
    gm, args = _step_inputs(pruned, llava_example(model, batch=1))
    check_static(gm, dict(args), "static decode step")
    shapes = [args[f"past_{i}"].shape for i in range(8)]
    outs = gm(*[args[n.name] for n in gm.graph.find_nodes(op="placeholder")])
    assert [o.shape for o in outs[1:]] == shapes              # caches written in place, same buffers
    assert outs[1].data_ptr() == args["past_0"].data_ptr()


def test_lint_rejects_data_dependent_prefill(llava):
    model, program = llava
    ex = llava_example(model, batch=1)
    static = gp.prune(model, STATIC, program=program)
    check_static(static.program.stages["prefill"].gm, static._prompt(ex.input_ids, ex.attention_mask, pixel_values=
                                                                     ex.pixel_values).prefill_inputs())
    exact = gp.prune(model, EXACT, program=program)
    prompt = exact._prompt(ex.input_ids, ex.attention_mask, pixel_values=ex.pixel_values)
    with pytest.raises(GraphVerificationError, match="statically traceable|data-dependent"):
        check_static(exact.program.stages["prefill"].gm, prompt.prefill_inputs())


def test_compiled_static_decode_matches_eager(llava):
    model, program = llava
    pruned = gp.prune(model, "fastv(layer=2, keep=9)", program=program)
    ex = llava_example(model, batch=1)
    eager = pruned.generate(**ex.as_kwargs(), max_new_tokens=6, eos_token_id=[])
    pruned.compile_decode(mode="default", backend="aot_eager")   # the graph compiles whole (CPU CI)
    assert torch.equal(pruned.generate(**ex.as_kwargs(), max_new_tokens=6, eos_token_id=[], static_cache=True), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (examples/gpu_check.py runs this)")
def test_reduce_overhead_decode_on_gpu(llava):
    model, program = llava
    pruned = gp.prune(model.cuda(), "fastv(layer=2, keep=9)")
    ex = llava_example(model, batch=1)
    kw = {k: v.cuda() for k, v in ex.as_kwargs().items()}
    eager = pruned.generate(**kw, max_new_tokens=8, eos_token_id=[])
    pruned.compile_decode(mode="reduce-overhead")
    assert torch.equal(pruned.generate(**kw, max_new_tokens=8, eos_token_id=[], static_cache=True), eager)
