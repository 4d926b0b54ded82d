"""Anatomy: what a captured graph holds (layers, attention with post-RoPE q/k/v, masks, rotary
tables, KV writes, vision spans, patch grid, CLS) and what its nodes cost."""
