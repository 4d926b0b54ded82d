"""`python -m graphprune ...` is the `graphprune` command."""
from graphprune.cli import main

raise SystemExit(main())
