"""Capture: the model's stages (vision encoder, LLM prefill, decode step) as torch.export graphs."""
