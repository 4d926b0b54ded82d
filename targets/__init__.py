"""Lowerings of rewritten graphs (imported as graphprune.targets). Here: eager PyTorch."""
