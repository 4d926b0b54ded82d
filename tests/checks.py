"""Assertions shared by the tests that compare a pruned model with an independent reference run."""
import torch


def assert_same_run(pruned, example, ref: dict, steps: int, kept=None):
    """Prefill logits at the real tokens (fp32, atol 1e-5), per-layer KV lengths and `steps` greedy tokens of
    `pruned` on `example` equal the reference run `ref` (reference.lm_generate's output); with `kept`, the
    kept prompt indices too. Returns the pruned prefill output."""
    out = pruned(**example.as_kwargs())
    if kept is not None:
        assert torch.equal(out.kept, kept)
    assert out.cache.lengths() == ref["kv_lens"]
    real = out.cache[-1].mask.bool()
    assert real.any()
    torch.testing.assert_close(out.logits[real], ref["prefill_logits"][real], atol=1e-5, rtol=1e-5)
    ids = pruned.generate(**example.as_kwargs(), max_new_tokens=steps, eos_token_id=[])
    assert torch.equal(ids[:, -steps:], ref["tokens"])
    return out


def assert_batch_equals_samples(pruned, example, steps: int = 8):
    """`pruned` on the left-padded batch `example` equals each sample run alone: logits at the real
    tokens (fp32, atol 1e-5), the kept prompt indices (less the padding) and `steps` greedy tokens. Real:
    neither padding nor a slot a static capacity masked (its cache mask), in the batch and alone alike."""
    batch = pruned(**example.as_kwargs())
    ids = pruned.generate(**example.as_kwargs(), max_new_tokens=steps, eos_token_id=[])
    pad = (example.attention_mask == 0).sum(1)
    for b in range(example.input_ids.shape[0]):
        one = example.sample(b)
        alone = pruned(**one.as_kwargs())
        real, alone_real = batch.cache[-1].mask[b].bool(), alone.cache[-1].mask[0].bool()
        torch.testing.assert_close(batch.logits[b][real], alone.logits[0][alone_real], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch.kept[b][real] - pad[b], alone.kept[0][alone_real])
        alone_ids = pruned.generate(**one.as_kwargs(), max_new_tokens=steps, eos_token_id=[])
        assert torch.equal(ids[b, -steps:], alone_ids[0, -steps:])


def assert_onnx_matches(pruned, out_dir, kwargs: dict, steps: int = 8):
    """`pruned` exported to ONNX and run on ONNX Runtime (CPU) keeps the same tokens, gives the same
    logits at the real tokens (1e-4) and the same greedy tokens as the eager pruned model."""
    from graphprune.targets.onnx import export_onnx
    from graphprune.targets.ort import OrtPrunedModel
    export_onnx(pruned, out_dir)
    runner = OrtPrunedModel(out_dir)
    ref, got = pruned(**kwargs), runner(**kwargs)
    assert torch.equal(ref.kept, got.kept)
    real = kwargs["attention_mask"].gather(1, ref.kept) == 1
    torch.testing.assert_close(got.logits[real], ref.logits[real], atol=1e-4, rtol=0)
    assert torch.equal(runner.generate(**kwargs, max_new_tokens=steps), pruned.generate(**kwargs, max_new_tokens=steps))
