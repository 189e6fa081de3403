"""Helper apps and a small harness for tests/test_app_side*.py (docs/app-side.md)."""
