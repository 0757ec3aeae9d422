"""The kernel-side Python API: `Cluster` and `Deployment` handles, the store views they read, their
text/HTML renderings, inline chat streams, and the kernel runtime (one background loop thread that
hosts the in-kernel services). The magics (`nb/`) and the CLI call this layer's public methods."""
