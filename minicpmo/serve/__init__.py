"""Serving: the realtime WebSocket server (`python -m minicpmo.serve`) on the batched duplex engine."""
