"""``python -m graphpress`` runs the CLI."""

from graphpress.cli import main

raise SystemExit(main())
