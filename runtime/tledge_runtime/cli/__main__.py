"""``python -m tledge_runtime.cli``."""

from tledge_runtime.cli.main import main

raise SystemExit(main())
