"""``python -m mrissl``: the same as the ``mrissl`` command."""

from mrissl.cli import main

raise SystemExit(main())
