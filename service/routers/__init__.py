"""Thin HTTP layers over the service classes: parse the path, call, wrap the result."""
