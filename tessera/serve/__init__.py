"""Serving: DvD (decoupled vision-language deployment) behind an OpenAI-compatible API.

protocol.py (the feature wire format), vision.py (bytes → features, LRU cache), vision_server.py (ZeroMQ vision
server), vision_client.py (worker pool on the language side), language_server.py (requests → engine), api.py
(FastAPI routes), launch.py (topologies). Import the submodules you need; this package imports nothing heavy.
"""
