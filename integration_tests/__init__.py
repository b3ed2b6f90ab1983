"""Integration tests against real PostgreSQL servers (see conftest.py)."""
