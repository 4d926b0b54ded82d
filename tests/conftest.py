import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))   # the independent reference lives beside the tests
# under pytest-xdist (CI runs `-n 2`, one worker per core) each worker runs one thread: the tiny
# graphs gain nothing from a second one, and two workers of two threads would oversubscribe the cores
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def llava():
    from graphprune.rewrite.pipeline import Program
    from graphprune.tools.zoo import tiny_llava
    model = tiny_llava()
    return model, Program.capture(model)


@pytest.fixture(scope="session")
def qwen():
    from graphprune.rewrite.pipeline import Program
    from graphprune.tools.zoo import tiny_qwen2vl
    model = tiny_qwen2vl()
    return model, Program.capture(model)


# -- tests whose work runs in a subprocess of its own, started as soon as they are collected -------
# A test marked @pytest.mark.background(start) has its subprocess started by start() right after
# collection, so it runs beside the rest of the suite (on the other core) instead of at its turn;
# the test takes it from the `background` fixture and waits for it. Only for self-contained scripts
# whose result does not depend on timing (e.g. a process's own RSS).
_STARTED: dict = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "background(start): start(): a subprocess.Popen the test waits for; "
                                       "started right after collection")


@pytest.hookimpl(trylast=True)          # after -k / -m deselection: only tests that will run
def pytest_collection_modifyitems(config, items):
    if WORKER:            # every worker collects every test: each starts its own when it runs them
        return
    for item in items:
        marker = item.get_closest_marker("background")
        if marker is not None and item.nodeid not in _STARTED:
            _STARTED[item.nodeid] = marker.args[0]()


def pytest_sessionfinish(session, exitstatus):
    for proc in _STARTED.values():            # a test deselected by -x / -k after start, or interrupted
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def background(request):
    """The subprocess of this test's background marker (started now if collection did not)."""
    proc = _STARTED.pop(request.node.nodeid, None)
    return proc if proc is not None else request.node.get_closest_marker("background").args[0]()
