"""Fixtures shared by the test files that ask for them by name."""

import pytest


@pytest.fixture
def one_thread():
    """torch at 1 thread for the test: a tiny model on a busy 2-core machine runs many times slower with two
    threads fighting over the cores. (Test files that train use it for every test: `pytestmark`.)"""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def quiet_and_seeded():
    """torch seeded at 0 and the exporters' warnings off, for the test (the export test files use it for every
    test: `pytestmark`)."""
    import warnings

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
