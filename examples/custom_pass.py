"""Authoring a new method: a complete token-pruning pass in ~20 lines, then running it.

The method ("knorm"): at layer K, keep the vision tokens whose post-RoPE keys in layer K-1 have
the largest L1 norm (DART's pivot criterion, used here as a method on its own). It declares
where it acts, what it reads and how it selects; graphprune captures the model, extracts the
keys from the graph, inserts the scoring and selection nodes, rewires the later layers and
shrinks their KV caches.

    python examples/custom_pass.py
"""
from dataclasses import dataclass

import graphprune as gp
from graphprune import Keys, Plan, TokenPass, TopK, register_pass


@register_pass
class KeyNorm(TokenPass):
    name = "knorm"
    stage = "prefill"

    @dataclass
    class Config:
        layer: int = 2
        keep: int | float = 0.25

    def plan(self) -> Plan:
        return Plan(
            layer=self.config.layer,
            signals={"keys": Keys(layer=self.config.layer - 1)},     # (B, images, tokens, H*d)
            score=lambda keys: keys.abs().sum(-1),                   # L1 norm per token
            select=TopK(self.config.keep),
            positions="keep",
        )


def main():
    from graphprune.tools.zoo import llava_example, tiny_llava

    model = tiny_llava()
    inputs = llava_example(model, batch=2, pad=(0, 3)).as_kwargs()
    pruned = gp.prune(model, "knorm(layer=2, keep=9)")
    ids = pruned.generate(**inputs, max_new_tokens=8)
    print(pruned.report.table())
    print("generated:", ids[:, -8:].tolist())
    return pruned, inputs


if __name__ == "__main__":
    main()
