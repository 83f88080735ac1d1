"""``python -m cluster.cli``: the duet command line."""

from cluster.cli import main

raise SystemExit(main())
