"""``python -m policy search ...`` (see ``policy.cli``)."""

from __future__ import annotations

from policy.cli import main

raise SystemExit(main())
