"""``python -m exporter`` is the same as the ``pgvitals`` command."""

import sys

from exporter.cli import main

sys.exit(main())
