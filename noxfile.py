"""nox sessions for the msa monorepo.

    nox -s cache core cute bridge   # one package + its msa dependencies in a fresh venv, its tests only
    nox -s tests                    # everything (CPU host: GPU tests skip with a reason)
    nox -s lint                     # ruff
    nox -s compile                  # compile-only kernel builds (sm_90a, sm_100a) through msa-cache
    nox -s gpu                      # GPU-marked tests with the host's own torch (no venv; run on a GPU host)

The CPU sessions install torch==2.13.0 (the CPU build on this project's CI hosts; see README for the caveat).
"""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
PACKAGES = {
    "cache": ["packages/msa-cache"],
    "core": ["packages/msa-cache", "packages/msa-core"],
    "cute": ["packages/msa-cache", "packages/msa-core", "packages/msa-cute"],
    "bridge": ["packages/msa-cache", "packages/msa-core", "packages/msa-cute", "packages/msa-bridge"],
}
TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3"]


def _install(session, pkg):
    deps = PACKAGES[pkg]
    if pkg != "cache":  # msa-cache must install and test without torch
        session.install(TORCH)
    session.install(*TEST_TOOLS)
    session.install(*[f"./{d}" for d in deps])


@nox.session(name="cache")
def cache(session):
    _install(session, "cache")
    session.run("python", "-c", "import sys, msa.cache; assert 'torch' not in sys.modules")
    session.run("pytest", "tests/cache", *session.posargs)


@nox.session(name="core")
def core(session):
    _install(session, "core")
    session.run("pytest", "tests/core", *session.posargs)


@nox.session(name="cute")
def cute(session):
    _install(session, "cute")
    session.run("pytest", "tests/cute", *session.posargs)


@nox.session(name="bridge")
def bridge(session):
    _install(session, "bridge")
    session.run("pytest", "tests/bridge", "tests/e2e", *session.posargs)


@nox.session
def tests(session):
    session.install(TORCH)
    session.install("-r", "requirements-dev.txt")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def compile(session):
    session.install(TORCH)
    session.install("-r", "requirements-dev.txt")
    session.run("pytest", "-m", "compile", *session.posargs)


@nox.session(venv_backend="none")
def gpu(session):
    """GPU tests with the host's torch (the GPU box has no network: see benchmarks/gpu_run.sh)."""
    session.run("python3", "-m", "pytest", "-m", "gpu", *session.posargs)
