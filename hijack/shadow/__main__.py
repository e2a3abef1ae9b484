"""`python -m hijack.shadow`: the program a shadow execs into."""

from hijack.shadow.program import main

raise SystemExit(main())
