"""The torch.compile backend runs the vision tower's layers the model's own code reads, no more.

LLaVA reads hidden_states[vision_feature_layer] (-2: every CLIP layer but the last); the tower's frame
also returns last_hidden_state, which LLaVA hands back as out.image_outputs. The compiled forward makes
exactly the linear calls graphprune's eager lowering makes, counted from the config by hand (CLIP
layers read x 6, projector 2, LM layers x 7, head 1), whether dynamo hands the backend the tower as a
frame of its own (a fresh model: transformers' output capturing breaks the graph at the tower's call)
or inside the body's frame (its hooks installed by an earlier call). last_hidden_state is computed on
first use (one CLIP layer's 6 linears, once) and equals the tower's own (its Hugging Face module)."""
from __future__ import annotations

import collections

import pytest
import torch

import graphprune as gp
from graphprune.tools import zoo

PIPELINE = "fastv(layer=2, keep=8)"


def _matmuls(fn) -> tuple[int, object]:
    """Linear calls made by fn() (aten addmm / mm, as eager aten, fx and Inductor graphs all run them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    counts = collections.Counter(e.name for e in prof.events())
    return counts["aten::addmm"] + counts["aten::mm"], out


def _linears_read(model) -> int:
    cfg = model.config
    read = cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1)      # CLIP layers feeding features
    return 6 * read + 2 + 7 * cfg.text_config.num_hidden_layers + 1


def _run(compiler: str, frame: str):
    """(model, inputs, the eager lowering, the compiled model), each run once (compiled outside the counts)."""
    model = zoo.tiny_llava()
    kw = zoo.llava_example(model, batch=1).as_kwargs()
    with torch.no_grad():
        if frame == "body":
            model(**kw)                 # installs transformers' output-capturing hooks: no graph break at the tower
        eager = gp.prune(model, PIPELINE)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="graphprune", options={"pipeline": PIPELINE, "compiler": compiler})
        compiled(**kw)
    return model, kw, eager, compiled


@pytest.fixture(scope="module")
def tower_frame():
    return _run("eager", "tower")


@pytest.mark.parametrize("compiler,frame", [
    ("eager", "tower"),
    pytest.param("eager", "body", marks=pytest.mark.slow),
    pytest.param("inductor", "body", marks=pytest.mark.slow)])
def test_compiled_forward_makes_the_linear_calls_of_the_eager_lowering(compiler, frame, request):
    model, kw, eager, compiled = request.getfixturevalue("tower_frame") if frame == "tower" else _run(compiler, frame)
    with torch.no_grad():
        eager_calls, want = _matmuls(lambda: eager(**kw))
        compiled_calls, got = _matmuls(lambda: compiled(**kw))
    assert compiled_calls == eager_calls == _linears_read(model)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5 if compiler == "eager" else 1e-4, rtol=0)

    with torch.no_grad():
        tower = model.model.vision_tower(kw["pixel_values"]).last_hidden_state
    last = got.image_outputs.last_hidden_state
    assert last.shape == tower.shape and last.dtype == tower.dtype
    first_use, value = _matmuls(lambda: last + 0)
    assert first_use == 6                                  # the last CLIP layer, run now
    again, _ = _matmuls(lambda: last * 1)
    assert again == 0
    torch.testing.assert_close(value, tower, atol=1e-5, rtol=0)
    assert type(value) is torch.Tensor


def test_with_grad_the_last_layer_runs_in_the_forward(tower_frame):
    """Autograd needs real tensors: with grad enabled the deferred layers run with the rest."""
    model, kw, _, compiled = tower_frame
    compiled(**kw)
    calls, got = _matmuls(lambda: compiled(**kw))
    assert calls == _linears_read(model) + 6
    last = got.image_outputs.last_hidden_state
    assert type(last) is torch.Tensor and last.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(last, model.model.vision_tower(kw["pixel_values"]).last_hidden_state,
                                   atol=1e-5, rtol=0)


@pytest.mark.slow
def test_llava_next_compiled_forward_runs_the_tower_layers_it_reads():
    """LLaVA-NeXT (anyres crops through the same CLIP tower, feature layer -2): the compiled forward's
    linear calls are the hand count; its logits are gp.prune's."""
    from graphprune.tools import family_zoo
    model = family_zoo.build("llava_next")
    kw = family_zoo.example(model, batch=1, pad=(0,), items=("image",), frames=4).as_kwargs()
    pipeline = "fastv(layer=2, keep=3)"
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="graphprune", options={"pipeline": pipeline, "compiler": "eager"})
    with torch.no_grad():
        compiled(**kw)
        calls, got = _matmuls(lambda: compiled(**kw))
        want = gp.prune(model, pipeline)(**kw)
    assert calls == _linears_read(model)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("frame", ["tower", "body"])
def test_a_feature_layer_given_to_the_call_is_read_whole(frame):
    """vision_feature_layer=-1 given to the call reads the last CLIP layer, which the config's -2 would
    defer: nothing is deferred, the logits are those of the model configured with -1."""
    model = zoo.tiny_llava()
    kw = zoo.llava_example(model, batch=1).as_kwargs()
    with torch.no_grad():
        if frame == "body":
            model(**kw)
        model.config.vision_feature_layer = -1
        want = gp.prune(model, PIPELINE)(**kw).logits
        model.config.vision_feature_layer = -2
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="graphprune", options={"pipeline": PIPELINE, "compiler": "eager"})
        compiled(**kw, vision_feature_layer=-1)
        calls, got = _matmuls(lambda: compiled(**kw, vision_feature_layer=-1))
    assert calls == _linears_read(model) + 6
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
