"""Benchmarks of sftkey against the reference and its peers: ``python -m bench --help``."""
from pathlib import Path

#: The repository root, where ``python -m bench`` runs its workers.
ROOT = Path(__file__).resolve().parents[1]
