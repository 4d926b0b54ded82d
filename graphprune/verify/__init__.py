"""Verify: checks that a captured or rewritten graph still computes what the eager model does."""
