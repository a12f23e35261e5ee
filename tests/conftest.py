"""Test-wide settings: offline, and one torch thread (the suite's networks are tiny; on 2 shared cores intra-op
threads mostly spin: the digits tests measured 16 s with two threads vs 0.4 s with one)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Property tests draw from a fixed seed so every run (and CI) sees the same examples.
from hypothesis import settings  # noqa: E402

settings.register_profile("reproducible", derandomize=True, database=None, deadline=None)
settings.load_profile("reproducible")
