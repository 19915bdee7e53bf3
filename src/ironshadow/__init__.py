"""IronShadow: a Digital Twin engine for factories."""

__version__ = "0.1.0"
