"""`dblend ui` in a real headless Chromium (Debian's package: `make chromium`, a step of `make test`, installs it).

Starts the app on a free local port with two digits experts, moves a weight slider, clicks Generate, waits for the
image, and checks that the shown scores change with the slider; checks the LS/negative-coefficient rule, the in-page
error for invalid input, and that files outside the app are not served. Saves a screenshot artifact.

Every wait is for an event: a page element or text (Playwright's ``expect``, which polls until it holds, with a long
ceiling for a loaded machine), never a fixed time. A click's result is awaited by something only that result shows
(its seed in the status line), so no earlier response can land after the next step has begun.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from faults import cannot_run_here

pytestmark = pytest.mark.browser

ARTIFACTS = Path(os.environ.get("DBLEND_ARTIFACTS", "runs/artifacts"))
CHROMIUM = "/usr/bin/chromium"
HEADLESS_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]


WAIT_MS = 120_000  # the ceiling of every wait for an event (a loaded 2-core machine); none waits a fixed time


def ensure_chromium() -> str:
    """Debian's chromium (Playwright's own browser download cannot work offline); `make chromium` installs it."""
    if not Path(CHROMIUM).exists():
        cannot_run_here(f"{CHROMIUM} is missing: `make chromium` installs Debian's package (`make test` runs it first)")
    return CHROMIUM


@pytest.fixture(autouse=True)
def patient_expectations():
    """Playwright's ``expect`` waits for its condition up to ``WAIT_MS`` instead of its default 5 s."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    yield
    expect.set_options(timeout=5_000)


RECEIVED: list = []  # (preference, method, seed) of every generation the server ran


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two distinct (randomly perturbed, not trained) adapters on the committed digits base, saved like real ones."""
    from diffusion_blend.adapters import save_adapter
    from diffusion_blend.lora import add_lora, lora_layers
    from diffusion_blend.testbeds.digits.model import lora_target_modules
    from diffusion_blend.testbeds.digits.train import load_default_digits_model

    folder = tmp_path_factory.mktemp("adapters")
    model = load_default_digits_model(progress=False)
    torch.manual_seed(0)  # peft initialises lora_A from the global generator
    generator = torch.Generator().manual_seed(0)
    paths = {}
    for name in ["ink", "compressibility"]:
        add_lora(model, name, rank=4, target_modules=list(lora_target_modules()))
        for layer in lora_layers(model):
            weight = layer.lora_B[name].weight
            weight.data = 0.05 * torch.randn(weight.shape, generator=generator)
        paths[name] = save_adapter(model, name, folder / f"{name}.safetensors", rewards={name: 1.0}, alpha=0.1)
    return folder, paths


@pytest.fixture(scope="module")
def server(experts):
    from diffusion_blend.testbeds.digits.studio import digits_studio
    from diffusion_blend.ui.app import build_app, launch

    folder, paths = experts
    studio = digits_studio(paths, num_images=16, num_inference_steps=20)
    generate = studio.generate

    def recording_generate(preference, method, seed, prompt=None):
        RECEIVED.append((preference, method, seed))
        return generate(preference, method, seed, prompt)

    studio.generate = recording_generate
    reference = {"rewards": ["ink", "compressibility"],
                 "series": {"DB-MPA": [{"ink": 0.30, "compressibility": 0.50}, {"ink": 0.35, "compressibility": 0.45}]}}
    app = build_app(studio, reference)
    port = free_port()
    launch(app, port=port, block=False)
    yield f"http://127.0.0.1:{port}", generate
    app.close()


def scores_of(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"(ink|compressibility)\s+(-?[0-9]+\.[0-9]+)", text)}


def test_ui_in_headless_chromium(server, capfd):
    from playwright.sync_api import expect, sync_playwright

    from diffusion_blend.preference import Preference

    url, direct_generate = server

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=ensure_chromium(), headless=True, args=HEADLESS_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        generate = page.locator("#generate")
        expect(generate).to_be_visible()
        scores = page.locator("#scores")
        status = page.locator("#status")
        # a first result on load, before any click (the digits model needs no prompt)
        expect(status).to_contain_text("Result for weights ink 0.5, compressibility 0.5, KL scale 1, DB-MPA, seed 0")
        expect(scores).to_contain_text("compressibility")
        expect(scores).to_contain_text("standard error")
        assert RECEIVED and RECEIVED[-1][0].weights == {"ink": 0.5, "compressibility": 0.5}

        # seed 1, then Generate: only this click's result names seed 1, so waiting for it waits for this response
        # (the same settings as on load gave the same text, and the response could land after the next step began)
        seed = page.locator("#seed input")
        seed.fill("1")
        expect(status).to_contain_text("Stale")  # the server has the new seed
        started = time.perf_counter()
        generate.click()
        expect(status).to_contain_text("Result for weights ink 0.5, compressibility 0.5, KL scale 1, DB-MPA, seed 1.")
        first_click_seconds = time.perf_counter() - started
        expect(page.locator("#samples img")).to_be_visible()
        before = scores_of(scores.inner_text())
        assert set(before) == {"ink", "compressibility"} and RECEIVED[-1][2] == 1

        # move the ink weight from 0.5 to 1.5 (twenty slider steps), then generate again with the same seed
        ink_slider = page.locator("#weight-ink input[type=range]")
        ink_slider.focus()
        for _ in range(20):
            page.keyboard.press("ArrowRight")
        assert float(ink_slider.input_value()) == pytest.approx(1.5)
        # weights 1.5 + 0.5 make the base coefficient negative: the server's slider handler disables LS and says why
        # (waiting for it also means the server has the new slider value before we click)
        expect(page.locator("#method-note")).to_contain_text("base: -1, ink: +1.5")
        expect(page.locator("#method-note")).to_contain_text("DB-MPA-LS is disabled")
        expect(status).to_contain_text("Stale")  # the image and star on show belong to the old weights
        expect(page.get_by_label("DB-MPA-LS (one model per step)")).to_have_count(0)
        expected = direct_generate(Preference({"ink": 1.5, "compressibility": 0.5}), "mpa", 1).scores
        assert abs(expected["ink"] - before["ink"]) > 1e-4  # the slider move really changes the result
        started = time.perf_counter()
        generate.click()
        expect(status).to_contain_text("Result for weights ink 1.5, compressibility 0.5, KL scale 1, DB-MPA, seed 1.")
        second_click_seconds = time.perf_counter() - started
        for name, value in expected.items():  # the page shows exactly what the blend computes for the new weights
            expect(scores).to_contain_text(f"{name}\t{value:.4f}")
        expect(status).not_to_contain_text("Stale")
        assert RECEIVED[-1][0].weights == {"ink": 1.5, "compressibility": 0.5} and RECEIVED[-1][1:] == ("mpa", 1)

        expect(page.locator("#samples img")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "ui-screenshot.png"), full_page=True)

        # a value typed outside a slider's range reaches the server (the page only clamps its range knob): a readable
        # note, no error pill, no server-log traceback (gradio's own range check gave both)
        kl_box = page.locator("#kl-scale input[type=number]")
        kl_box.fill("5")
        kl_box.press("Enter")
        expect(page.locator("#method-note")).to_contain_text("KL scale must be between 0 and 3, got 5")
        assert "greater than maximum" not in page.content()
        assert page.get_by_text("Error", exact=True).count() == 0
        kl_box.fill("1")
        kl_box.press("Enter")
        expect(page.locator("#method-note")).to_contain_text("base: -1, ink: +1.5")
        expect(status).not_to_contain_text("Stale")  # the controls are those of the result on show again

        # invalid input is rejected in the page with a readable message, no traceback
        seed.fill("-3")
        expect(status).to_contain_text("Stale")  # the server has the new seed
        generate.click()
        expect(page.get_by_text("the seed must be a non-negative whole number")).to_be_visible()
        assert "Traceback" not in page.content()

        page.screenshot(path=str(ARTIFACTS / "ui-invalid-input.png"), full_page=True)
        # the Pareto plot is shown whole: scaled, not cropped, and nothing of the page drawn over it
        natural, shown = page.locator("#pareto img").evaluate(
            "img => [[img.naturalWidth, img.naturalHeight], [img.clientWidth, img.clientHeight]]")
        assert natural[1] > 0 and abs(shown[0] / shown[1] - natural[0] / natural[1]) < 0.02, (natural, shown)
        covered = page.locator("#pareto img").evaluate("""img => {
            const r = img.getBoundingClientRect(); const hits = [];
            // any text in the image's band of the page (gradio's block label is a strip across the image's top)
            for (const el of document.querySelectorAll('#pareto *')) {
                if (el.contains(img) || !el.innerText || !el.innerText.trim()) continue;
                const b = el.getBoundingClientRect();
                if (b.width && b.height && b.top < r.bottom && b.bottom > r.top)
                    hits.push(el.innerText.trim().slice(0, 80));
            }
            return hits; }""")
        assert covered == [], covered
        browser.close()
    server_log = capfd.readouterr()
    assert "Traceback" not in server_log.err + server_log.out, server_log.err[-3000:]
    timing = f"click-to-image: first {first_click_seconds:.2f} s, after slider move {second_click_seconds:.2f} s\n"
    (ARTIFACTS / "ui-timing.txt").write_text(timing)
    print(timing)


def test_files_outside_the_app_are_not_served(server):
    url, _ = server
    for path in ["/gradio_api/file=/etc/passwd", "/file=/etc/passwd", "/gradio_api/file=../../pyproject.toml"]:
        try:
            with urllib.request.urlopen(url + path, timeout=30) as response:
                body = response.read().decode(errors="replace")
            assert "root:" not in body and "[project]" not in body
        except urllib.error.HTTPError as err:
            assert err.code in (403, 404)


def test_adapter_paths_outside_the_configured_folders_are_refused(experts, tmp_path):
    from diffusion_blend.errors import DiffusionBlendError
    from diffusion_blend.ui.paths import resolve_within

    folder, paths = experts
    assert resolve_within(paths["ink"], [folder]) == paths["ink"].resolve()
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(paths["ink"], outside)
    with pytest.raises(DiffusionBlendError, match="outside the configured adapter folders"):
        resolve_within(outside, [folder])
    with pytest.raises(DiffusionBlendError, match="outside"):
        resolve_within(folder / ".." / outside.name, [folder])


def test_star_has_standard_error_bars():
    """The star's +-2 se bars: the same point drawn with and without a standard error differs only by the bars."""
    from diffusion_blend.ui.app import pareto_figure

    reference = {"rewards": ["ink", "compressibility"],
                 "series": {"DB-MPA": [{"ink": 0.30, "compressibility": 0.50}, {"ink": 0.40, "compressibility": 0.40}]}}
    point = {"ink": 0.35, "compressibility": 0.45}
    bare = pareto_figure(reference, point, {"ink": 0.0, "compressibility": 0.0})
    with_bars = pareto_figure(reference, point, {"ink": 0.02, "compressibility": 0.02})
    assert bare.shape == with_bars.shape and (bare != with_bars).any(axis=2).sum() > 50
    assert (pareto_figure(reference, point) == bare).all()  # no se given: no bars


@pytest.fixture(scope="module")
def sd3_server(tmp_path_factory):
    """``dblend ui --base`` on the tiny SD3 base of ``dblend tiny-base --kind sd3``, experts named apart from their
    rewards (so the page must label scores by reward), through the command's own studio builder."""
    from diffusion_blend.cli import build_parser
    from diffusion_blend.commands.ui import _initial_smc, check_args, pipeline_studio
    from diffusion_blend.pipelines.tiny import write_tiny_base
    from diffusion_blend.ui.app import build_app, launch

    files = write_tiny_base(tmp_path_factory.mktemp("tiny-sd3"), kind="sd3")
    args = build_parser().parse_args(["ui", "--base", str(files["base"]), "--adapter", f"bright={files['brightness']}",
                                      "--adapter", f"vivid={files['saturation']}", "--resolution", "16",
                                      "--device", "cpu"])
    check_args(args)
    studio = pipeline_studio(args)
    app = build_app(studio, initial_smc=_initial_smc(args, studio.smc))
    port = free_port()
    launch(app, port=port, block=False)
    yield f"http://127.0.0.1:{port}"
    app.close()


def test_ui_on_an_sd3_base_names_its_sampler_and_labels_scores_by_reward(sd3_server, capfd):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=ensure_chromium(), headless=True, args=HEADLESS_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(sd3_server)
        expect(page.locator("#generate")).to_be_visible()
        header = page.get_by_text("Stable Diffusion 3 / 3.5 base")
        expect(header).to_contain_text("flow SDE noise level 0.7, 28 steps, guidance 7")  # the spec's, not DDIM's
        expect(header).to_contain_text("bright (brightness), vivid (saturation)")
        # the experts state their alpha: SMC's controls are live, with what they do next to them
        expect(page.locator("#particles")).to_contain_text("N > 1 = SMC on the DB-MPA blend")
        page.locator("#prompt textarea").fill("a red car")
        page.locator("#generate").click()
        scores = page.locator("#scores")
        expect(scores).to_contain_text("bright (brightness)")
        expect(scores).to_contain_text("vivid (saturation)")
        expect(page.locator("#status")).to_contain_text("The blend serves the target")
        page.screenshot(path=str(ARTIFACTS / "ui-sd3.png"), full_page=True)
        browser.close()
    server_log = capfd.readouterr()
    assert "Traceback" not in server_log.err + server_log.out, server_log.err[-3000:]
