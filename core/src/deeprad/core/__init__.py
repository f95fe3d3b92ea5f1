"""Shared core used by the operator, the trainer and the aggregator.

Components import only from here; they never import each other.
"""

# Every component's pyproject.toml carries the same version (tests/unit/test_layering.py).
__version__ = "0.1.0"
