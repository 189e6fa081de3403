"""Helper apps and a small harness for tests/test_app_side*.py (issue 5)."""
