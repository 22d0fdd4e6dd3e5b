"""The Gradio demo, tested two ways: through gradio_client against the running app, and in a real headless
Chromium (Debian's package, driven by Playwright) that sets a method, clicks Generate and sees both images."""

import dataclasses
import shutil
import socket

import pytest

gradio = pytest.importorskip("gradio")

from mmattn.demos import app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    demo = app.launch(port=free_port(), block=False)
    yield demo
    demo.close()


def defaults(names, **overrides) -> list:
    """Every method control's value in the app's order: its default (empty head selections: the middle block), or
    ``overrides["<method>_<field>"]``."""
    return [overrides.get(f"{name}_{f.name}", "" if f.default is dataclasses.MISSING else f.default)
            for name in names for f in app.controls_of(name)]


def test_client_generates_both_images_and_answers(server):
    from gradio_client import Client
    from PIL import Image

    client = Client(server.local_url, verbose=False)
    baseline, intervened, summary, footprint = client.predict(
        "mmattn/shapes-t2i", "a red circle left of a blue square", 3, 4, "softpag", *defaults(app.GUIDANCE), 0,
        api_name="/generate")
    a, b = Image.open(baseline), Image.open(intervened)
    assert a.size == b.size == (64, 64) and a.tobytes() != b.tobytes() and footprint is None
    assert summary.startswith("softpag on transformer_blocks.2:*")
    *_, summary, footprint = client.predict("mmattn/shapes-t2i", "a red circle", 3, 4, "softpag",
                                            *defaults(app.GUIDANCE), 3, api_name="/generate")
    assert "+ 3x3 window" in summary and Image.open(footprint).size == (192, 192)
    _, video, summary, _ = client.predict("tiny/wan", "a red fox", 0, 2, "stg", *defaults(app.GUIDANCE), 0,
                                          api_name="/generate")
    assert Image.open(video).n_frames == 5 and summary.startswith("stg on blocks.")
    plain, pruned, overlay, text = client.predict(None, 7, "how many shapes are there", "fastv",
                                                  *defaults(app.VQA_METHODS), api_name="/answer")
    assert plain and pruned and Image.open(overlay).size == (192, 192) and "72 of 144 visual tokens" in text
    *_, overlay, text = client.predict(None, 7, "what color is the circle", "var",
                                       *defaults(app.VQA_METHODS, var_tau=1.5, var_first_layer=1), api_name="/answer")
    assert text.startswith("var: ") and "visual sink tokens (outlined)" in text, text
    assert int(text.split()[1]) > 0  # this tau finds sinks on shapes-vlm


@pytest.mark.parametrize("prompt, seed, steps, message", [
    ("x" * 201, 0, 4, "prompt must have 1 to 200 characters; got 201"),
    ("a red circle", -1, 4, "seed=-1 is out of range: expected an int in [0, 2147483647]"),
    ("a red circle", 0, 99, "Value 99 is greater than maximum value 50"),  # gradio's own slider check
])
def test_client_gets_a_clear_message_for_bad_input(server, prompt, seed, steps, message):
    import re

    from gradio_client import Client

    client = Client(server.local_url, verbose=False)
    with pytest.raises(Exception, match=re.escape(message)):
        client.predict("mmattn/shapes-t2i", prompt, seed, steps, "softpag", *defaults(app.GUIDANCE), 0,
                       api_name="/generate")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_sets_a_method_clicks_generate_and_sees_both_images(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.local_url)
            method = page.get_by_label("method").first
            method.click()
            method.fill("pag")
            page.get_by_role("option", name="pag", exact=True).click()
            page.locator("#generate").click()
            page.locator("#baseline img").wait_for(timeout=120_000)
            page.locator("#intervened img").wait_for(timeout=120_000)
            page.get_by_text("pag on transformer_blocks.2:*").wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 0
