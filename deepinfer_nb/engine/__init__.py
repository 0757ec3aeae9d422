"""The engine layer: the gRPC shim in front of vLLM (`python -m deepinfer_nb.engine`), the async
client the gateway and workers use, and local model builds. Never imports the store; importing
this package does not import vLLM.
"""
