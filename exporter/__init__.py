"""pgvitals: a PostgreSQL exporter for Prometheus that tells the truth without hurting the database."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pgvitals")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
