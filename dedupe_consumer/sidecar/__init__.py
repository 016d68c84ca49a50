"""Sidecar mode: consume, dedupe, POST each unique event to a local HTTP endpoint."""
