"""Rewrite: the pass API (TokenPass, Plan, signals, rules), the registry of methods, and the
machinery that inserts scoring and selection nodes and rewires every downstream use. The
methods themselves live in graphprune.passes (the repository's passes/ folder)."""
