"""Shared core used by the operator, the trainer and the aggregator.

Components import only from here; they never import each other.
"""
