"""`python -m fastpeft ...` runs the `fastpeft` command."""
from fastpeft.cli import main

raise SystemExit(main())
