"""Helpers for tests of the worker code (tiny models, toy data); never used in production paths."""
