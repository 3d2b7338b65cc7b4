"""Connectors: one module per kind of system, registered by name."""
