"""The opt-in TimescaleDB tier. A package, so its conftest does not shadow tests/conftest.py."""
