"""The metadata store: `MetaStore` (base), `open_store(url)`, the memory and etcd backends."""
