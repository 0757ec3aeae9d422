"""Shared test set-up. Fixtures live in tests/fixtures/, one module per real service."""

pytest_plugins = [
    "tests.fixtures.etcd",
    "tests.fixtures.engine",
    "tests.fixtures.fake_python",
]
