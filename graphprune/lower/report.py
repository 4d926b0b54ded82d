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
    _flops: object = field(default=None, repr=False)          # lazily counted {layer|"head"|"other": FLOPs}
    patches_kept: list | None = None
    decode_steps: int = 0
    kv_bytes_after_decode: int | None = None
    notes: list[str] = field(default_factory=list)
    pruned_nothing: bool = False                # every layer kept every real prompt token of every sample

    @classmethod
    def build(cls, pruned, cache, vision_tokens, prompt, notes, prompt_tokens=None) -> "Report":
        """prompt_tokens: (B,) real tokens of each sample as given (before any pass); a layer whose
        cache holds as many real tokens for every sample pruned nothing."""
        from graphprune.anatomy.cost import count_flops
        lengths = cache.lengths()
        flops = None
        if prompt is not None:     # counted on first use: a fake-tensor run of the prefill graph
            gm = pruned.program.stages["prefill"].gm
            flops = lambda: count_flops(gm, **prompt.prefill_inputs())  # noqa: E731
        return cls(
            pipeline=" | ".join(repr(p) for p in pruned.pipeline) or "(unpruned)",
            layers=pruned.num_layers, batch=cache[0].keys.shape[0], vision_tokens_in=vision_tokens,
            tokens_per_layer=lengths, kv_len_per_layer=lengths, kv_bytes_per_layer=cache.bytes_per_layer(),
            _flops=flops,
            patches_kept=None if prompt is None or prompt.patches_kept is None else prompt.patches_kept.tolist(),
            notes=list(notes),
            pruned_nothing=prompt_tokens is not None and all(
                bool((c.mask.sum(1) == prompt_tokens).all()) for c in cache))

    def with_decode(self, cache, steps: int) -> "Report":
        self.decode_steps = steps
        self.kv_bytes_after_decode = sum(cache.bytes_per_layer())
        return self

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)

    def _flop_counts(self) -> dict:
        if callable(self._flops):
            self._flops = self._flops()
        return self._flops or {}

    @property
    def flops_per_layer(self) -> list[int]:
        f = self._flop_counts()
        return [f.get(i, 0) for i in range(self.layers)] if f else []

    @property
    def flops_other(self) -> int:
        return sum(v for k, v in self._flop_counts().items() if not isinstance(k, int))

    @property
    def flops(self) -> int:
        return sum(self.flops_per_layer) + self.flops_other

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d.update(kv_bytes=self.kv_bytes, flops=self.flops, flops_per_layer=self.flops_per_layer,
                 flops_other=self.flops_other)
        return d

    def table(self) -> str:
        rows = [f"pipeline: {self.pipeline}", f"vision tokens entering the LLM (per sample): {self.vision_tokens_in}"]
        rows += [f"note: {n}" for n in self.notes]
        if self.pruned_nothing:
            rows.append("nothing pruned: every layer ran on every prompt token")
        rows.append(f"{'layer':>5} {'tokens':>7} {'KV bytes':>12} {'GFLOPs':>10}")
        for i in range(self.layers):
            fl = self.flops_per_layer[i] / 1e9 if self.flops_per_layer else float("nan")
            rows.append(f"{i:>5} {self.tokens_per_layer[i]:>7} {self.kv_bytes_per_layer[i]:>12,} {fl:>10.4f}")
        rows.append(f"{'total':>5} {'':>7} {self.kv_bytes:>12,} {self.flops / 1e9:>10.4f}"
                    + ("  (total includes lm_head)" if self.flops_other else ""))
        return "\n".join(rows)
