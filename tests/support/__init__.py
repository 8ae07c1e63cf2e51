"""Helpers shared by test modules (so they import neither conftest nor each other)."""
