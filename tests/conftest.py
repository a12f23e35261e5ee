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


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``dblend demo --quick`` run once per session (tests/test_demo.py checks it; tests/test_kill_resume.py compares a
    killed and resumed run with it): ``(out, summary, messages, seconds)``."""
    import time

    from diffusion_blend.testbeds.digits.config import DemoConfig
    from diffusion_blend.testbeds.digits.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    messages: list[str] = []
    started = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        summary = run_demo(out, DemoConfig.quick(), progress=False, log=messages.append)
    finally:
        torch.set_num_threads(threads)  # run_demo sets the config's one thread
    return out, summary, messages, time.perf_counter() - started


@pytest.fixture(scope="session")
def tiny_sd_base(tmp_path_factory):
    """``dblend tiny-base --kind sd``'s files, written once per session: ``{"base", "brightness", "saturation"}``."""
    from diffusion_blend.pipelines.tiny import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("tiny-sd") / "tiny", kind="sd")
