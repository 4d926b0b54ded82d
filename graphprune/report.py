"""What a pruned call did: tokens, KV-cache bytes and FLOPs per layer, as a table or JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Report:
    pipeline: str
    layers: int
    batch: int
    vision_tokens_in: int                       # per sample, entering the LLM
    tokens_per_layer: list[int]                 # sequence length each layer ran on (per sample)
    kv_len_per_layer: list[int]                 # cache length after prefill
    kv_bytes_per_layer: list[int]               # whole batch
    flops_per_layer: list[int] = field(default_factory=list)   # prefill, whole batch
    flops_other: int = 0
    patches_kept: list | None = None
    decode_steps: int = 0
    kv_bytes_after_decode: int | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, pruned, cache, vision_tokens, prompt, notes) -> "Report":
        from .cost import count_flops
        lengths = cache.lengths()
        flops, other = [], 0
        if prompt is not None:
            gm = pruned.program.stages["prefill"].gm
            f = count_flops(gm, prompt.embeds, prompt.position_ids, prompt.attention_mask, prompt.vision_pos)
            flops = [f.get(i, 0) for i in range(pruned.num_layers)]
            other = sum(v for k, v in f.items() if not isinstance(k, int))
        return cls(
            pipeline=" | ".join(repr(p) for p in pruned.pipeline) or "(unpruned)",
            layers=pruned.num_layers, batch=cache[0].keys.shape[0], vision_tokens_in=vision_tokens,
            tokens_per_layer=lengths, kv_len_per_layer=lengths, kv_bytes_per_layer=cache.bytes_per_layer(),
            flops_per_layer=flops, flops_other=other,
            patches_kept=None if prompt is None or prompt.patches_kept is None else prompt.patches_kept.tolist(),
            notes=list(notes))

    def with_decode(self, cache, steps: int) -> "Report":
        self.decode_steps = steps
        self.kv_bytes_after_decode = sum(cache.bytes_per_layer())
        return self

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)

    @property
    def flops(self) -> int:
        return sum(self.flops_per_layer) + self.flops_other

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(kv_bytes=self.kv_bytes, flops=self.flops)
        return d

    def table(self) -> str:
        rows = [f"pipeline: {self.pipeline}", f"vision tokens entering the LLM (per sample): {self.vision_tokens_in}"]
        rows += [f"note: {n}" for n in self.notes]
        rows.append(f"{'layer':>5} {'tokens':>7} {'KV bytes':>12} {'GFLOPs':>10}")
        for i in range(self.layers):
            fl = self.flops_per_layer[i] / 1e9 if self.flops_per_layer else float("nan")
            rows.append(f"{i:>5} {self.tokens_per_layer[i]:>7} {self.kv_bytes_per_layer[i]:>12,} {fl:>10.4f}")
        rows.append(f"{'total':>5} {'':>7} {self.kv_bytes:>12,} {self.flops / 1e9:>10.4f}"
                    + ("  (incl. embedding-free head/other)" if self.flops_other else ""))
        return "\n".join(rows)
