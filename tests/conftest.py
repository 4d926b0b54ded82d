import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))   # the independent reference lives beside the tests
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
