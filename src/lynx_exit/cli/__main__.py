"""`python -m lynx_exit.cli`: the same as the `lynx-exit` command."""

from lynx_exit.cli import main

raise SystemExit(main())
