"""Helpers for tests and benchmarks (not needed to serve)."""
