"""``python -m vgcore``: the ``vgcore`` command (vgcore.cli)."""

from vgcore.cli import main

raise SystemExit(main())
