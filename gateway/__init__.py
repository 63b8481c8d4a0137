"""The HTTP gateway: Strata's fourth process, an OpenAI-compatible API and /metrics in
front of the compute node's gRPC Generate (app.py)."""
