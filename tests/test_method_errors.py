"""Bad options of DART, random and MustDrop fail at gp.prune(...) time with a PassConfigError that names
the option (nothing has run on data yet); prompts a method cannot handle fail with an InputError when
the pruned model is called."""
import pytest

import graphprune as gp
from graphprune.errors import GraphpruneError, InputError, PassConfigError
from graphprune.tools.zoo import llava_example

CONFIG_ERRORS = [
    # (method, options, words the message must contain)
    ("mustdrop_merge", dict(window=7), ["window=7", "6x6"]),               # larger than the 6x6 grid
    ("mustdrop_merge", dict(window=1), ["window=1"]),
    ("mustdrop_merge", dict(capacity=37), ["capacity=37", "36"]),
    ("mustdrop_merge", dict(mode="exact", capacity=20), ["capacity", "static"]),
    ("mustdrop_merge", dict(mode="fast"), ["mode", "'fast'"]),
    ("mustdrop_keys", dict(ratio=0.0), ["ratio"]),
    ("mustdrop_keys", dict(ratio=1.5), ["ratio"]),
    ("mustdrop_filter", dict(gamma=-1, alpha=0.1, layers=(2,)), ["threshold", "gamma=-1"]),
    ("mustdrop_filter", dict(gamma=0.1, alpha=-0.5, layers=(2,), capacity=8), ["alpha=-0.5"]),
    ("mustdrop_filter", dict(keep=100, layers=(2,)), ["gamma", "alpha", "keep=100"]),  # no preset for 100
    ("mustdrop_filter", dict(layers=(2,)), ["gamma", "alpha", "keep"]),
    ("mustdrop_filter", dict(gamma=0.1, alpha=0.1, layers=(2,), mode="static"), ["static", "capacity"]),
    ("mustdrop_filter", dict(gamma=0.1, alpha=0.1, layers=(2,), capacity=0), ["capacity", "0"]),
    ("mustdrop_filter", dict(gamma=0.1, alpha=0.1, layers=(3, 2), capacity=8), ["layers"]),
    ("mustdrop_filter", dict(gamma=0.1, alpha=0.1, layers=(0,), capacity=8, placement="before"), ["layers"]),
    ("mustdrop_filter", dict(gamma=0.1, alpha=0.1, layers=(-1,), capacity=8), ["layers"]),
    ("mustdrop_filter", dict(gamma=0.1, alpha=0.1, layers=(2,), capacity=8, placement="after"), ["placement"]),
    ("mustdrop_filter", dict(gamma=0.1, alpha=0.1, layers=(2,), capacity=8, positions="shift"), ["positions"]),
    ("mustdrop_merge", dict(order="sorted"), ["order", "'sorted'"]),
    ("mustdrop_filter", dict(keep=0, layers=(2,)), ["keep=0"]),
    ("mustdrop_cache", dict(layers=(2,)), ["layers"]),
    ("dart", dict(keep=0), ["keep=0"]),
    ("dart", dict(keep=1.5), ["keep=1.5"]),
    ("dart", dict(keep=37), ["keep=37", "36"]),
    ("dart", dict(keep=9, criterion="l2_norm"), ["criterion", "'l2_norm'"]),
    ("dart", dict(keep=3, vision_pivots=4), ["keep=3", "vision_pivots=4"]),
    ("dart", dict(keep=9, vision_pivots=0, text_pivots=0), ["pivot"]),
    ("dart", dict(keep=9, text_pivots=-1), ["text_pivots=-1"]),
    ("dart", dict(keep=9, layer=0), ["layer=0"]),
    ("dart", dict(keep=9, pivots=4), ["pivots", "vision_pivots"]),         # unknown option: lists the real ones
    ("random", dict(keep=0), ["keep=0"]),
    ("random", dict(keep=-0.5), ["keep=-0.5"]),
    ("random", dict(keep=4, stage="encoder"), ["stage", "'encoder'"]),
    ("mustdrop", dict(keep=64, mode="fast"), ["mode", "'fast'"]),
    ("mustdrop", dict(keep=100), ["keep=100", "gamma"]),
    ("mustdrop", dict(keep=64, widow=3), ["widow"]),
]


@pytest.mark.parametrize("method,opts,words", CONFIG_ERRORS,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o, _ in CONFIG_ERRORS])
def test_bad_options_fail_at_prune_time(llava, method, opts, words):
    model, program = llava
    with pytest.raises(PassConfigError) as e:
        gp.prune(model, method, program=program, **opts)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_bad_option_in_pipeline_string(llava):
    model, program = llava
    with pytest.raises(PassConfigError, match="gamma=-1"):
        gp.prune(model, "mustdrop_keys() | mustdrop_filter(gamma=-1, alpha=0.1, layers=(2,), capacity=8)",
                 program=program)
    with pytest.raises(PassConfigError, match="criterion"):
        gp.prune(model, "random(keep=4) | dart(keep=9, criterion='l3')", program=program)
    with pytest.raises(PassConfigError, match="unknown method 'dartt'"):
        gp.prune(model, "dartt(keep=9)", program=program)


def test_dart_more_text_pivots_than_instruction_tokens(llava):
    """Sample 1 has 7 - 3 = 4 instruction tokens: 5 text pivots are rejected when the prompt is laid out."""
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=2)
    pruned = gp.prune(model, "dart", keep=9, text_pivots=5, program=program)   # fine until a prompt is seen
    with pytest.raises(InputError) as e:
        pruned(**ex.as_kwargs())
    msg = str(e.value)
    assert "text_pivots=5" in msg and "4 instruction tokens" in msg
    with pytest.raises(InputError, match="text_pivots=5"):
        pruned.generate(**ex.as_kwargs(), max_new_tokens=2)
    # the same prompt with 4 text pivots runs
    out = gp.prune(model, "dart", keep=9, text_pivots=4, program=program)(**ex.as_kwargs())
    assert out.kept.shape[0] == 2


def test_exact_mode_needs_one_count_per_batch(llava):
    """Exact thresholds keep a data-dependent count; a batch whose images differ says to use static mode."""
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=2)        # tau=0.01 merges 2 tiles in one image, 3 in the other
    pruned = gp.prune(model, "mustdrop_merge", tau=0.01, mode="exact", program=program)
    with pytest.raises(InputError) as e:
        pruned(**ex.as_kwargs())
    assert "mode='static'" in str(e.value) and "mustdrop_merge" in str(e.value)
    # static mode batches the same prompt
    out = gp.prune(model, "mustdrop_merge", tau=0.01, mode="static", capacity=30, program=program)(**ex.as_kwargs())
    img = ex.input_ids.gather(1, out.kept) == model.config.image_token_id
    assert img.sum(1).tolist() == [30, 30]


def test_errors_are_graphprune_errors():
    assert issubclass(PassConfigError, GraphpruneError) and issubclass(InputError, GraphpruneError)
    assert issubclass(PassConfigError, ValueError)
