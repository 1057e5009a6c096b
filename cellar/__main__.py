"""`python -m cellar ...` runs the command line, as `cellar ...` does."""

from .cli import main

raise SystemExit(main())
