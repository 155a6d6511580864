"""``python -m peekproxy`` is the same as the ``peekproxy`` console script."""

from peekproxy.cli import main

raise SystemExit(main())
