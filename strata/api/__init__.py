"""What clients speak: the gRPC client of the compute node's Generate API, OpenAI's
request and response bodies, and chat templates."""
