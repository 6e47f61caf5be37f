"""Serving layer: the Ray Serve deployment graph (``serve.app``) and its HTTP API."""
