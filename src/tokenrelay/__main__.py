"""`python -m tokenrelay`: the command line."""

from tokenrelay.cli import main

raise SystemExit(main())
