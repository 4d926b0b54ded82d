"""Lower: running the rewritten graphs (PrunedModel, prune) with per-layer KV caches, and the
report of what each pass did. Other lowerings (Inductor, ONNX, flash-attn, packed linears) are in
graphprune.targets (the repository's targets/ folder)."""
