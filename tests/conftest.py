"""Suite-wide guard: a test that points msa-cache at a temporary directory must not leave the process-wide store
there. Tests monkeypatch MSA_CACHE_DIR and call ``get_store(refresh=True)``; if their teardown rebuilds the store
before the environment is restored, every later test sees a store without the node's imported bundle (H100
session 3 run 13: 86 CuTe GPU tests failed with ToolchainUnavailableError after tests/core's JIT tests).
"""

import pytest
from msa.cache import get_store
from msa.cache import store as _store_mod


@pytest.fixture(autouse=True)
def _restore_process_store():
    # autouse fixtures are set up before the test's own fixtures (monkeypatch included), so this teardown runs
    # after monkeypatch has restored the environment
    before = _store_mod._STORE
    yield
    if _store_mod._STORE is not before:
        get_store(refresh=True)
