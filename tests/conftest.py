"""Shared test set-up. Fixtures live in tests/fixtures/, one module per real service."""

pytest_plugins = [
    "tests.fixtures.etcd",
    "tests.fixtures.engine",
    "tests.fixtures.fake_python",
]

import os  # noqa: E402

import pytest  # noqa: E402

from deepinfer_nb.control import warmpool  # noqa: E402

# Workers in tests keep no warm pool unless a test asks for one ([agent] warm_pool = N): a member
# imports torch and vLLM (about 20 s of CPU and 1.5 GiB here), which every worker of the suite
# would pay. Subprocesses (`deepinfer-nb up`, notebook kernels) read the variable.
os.environ.setdefault("DEEPINFER_AGENT__WARM_POOL", "0")


@pytest.fixture(autouse=True, scope="session")
def _no_automatic_warm_pool() -> object:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warmpool, "AUTO_CPU_SIZE", 0)
        yield
