"""``python -m prune_peft.cli VERB ...``, the same as the ``prune-peft`` command."""

from . import main

raise SystemExit(main())
