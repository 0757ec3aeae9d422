"""Generated gRPC code (protos/generate.py). Never edit by hand."""
