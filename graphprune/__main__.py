"""`python -m graphprune ...` is the `graphprune` command."""
from .cli import main

raise SystemExit(main())
