"""The OpenAI-compatible gateway (FastAPI): protocol models, routers, routing table, metrics."""
