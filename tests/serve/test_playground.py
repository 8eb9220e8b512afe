"""The playground page at /: served whole, and driven in a real headless Chromium (Debian's
chromium + chromium-driver through selenium), where it streams a completion."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gpt2onnx.runtime.model import Model
from gpt2onnx.serve import Engine
from tests.conftest import EMBEDDED_MODEL
from tests.serve.helpers import MODEL_NAME, LiveServer, make_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_the_page_is_served_with_a_strict_policy(module_engine: Engine) -> None:
    with TestClient(make_app(module_engine)) as c:
        r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    page = r.text
    # No build step and nothing fetched from elsewhere: no external scripts, styles or URLs.
    assert "<script src" not in page and "<link" not in page
    assert "http://" not in page and "https://" not in page
    for element in ("prompt", "generate", "output", "ttft", "tps", "card"):
        assert f'id="{element}"' in page


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no headless Chromium: install Debian's chromium and chromium-driver "
                    "(make test does where apt-get works)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (the [dev] extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="gpt2onnx-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_playground_streams_a_completion_in_chromium(
        browser: object, make_engine: Callable[..., Engine],
        export_folder: Callable[..., Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not (EMBEDDED_MODEL / "config.json").exists():
        pytest.skip("the embedded model is not in this checkout")
    # The trained embedded model: its greedy text is visible characters (a random tiny
    # model's is often bytes that never complete a character).
    folder = export_folder(EMBEDDED_MODEL, layout="fused", precision="fp32")
    prompt = "def read_file(path):"
    want = Model(folder).generate(prompt, max_new_tokens=24).text
    assert want.strip()
    driver = browser
    server = LiveServer(make_app(make_engine(folder),
                                 allowed_hosts=["127.0.0.1", "localhost"]))
    try:
        driver.get(server.url + "/")  # type: ignore[attr-defined]
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: MODEL_NAME in d.find_element(By.ID, "card").text)
        card = driver.find_element(By.ID, "card").text  # type: ignore[attr-defined]
        assert "context 256 tokens" in card, card

        box = driver.find_element(By.ID, "prompt")  # type: ignore[attr-defined]
        box.clear()
        box.send_keys(prompt)
        for field, value in (("max_tokens", "24"), ("temperature", "0")):
            el = driver.find_element(By.ID, field)  # type: ignore[attr-defined]
            el.clear()
            el.send_keys(value)
        driver.find_element(By.ID, "generate").click()  # type: ignore[attr-defined]
        wait.until(lambda d: d.find_element(By.ID, "status").text in ("done", "failed"))
        find = driver.find_element  # type: ignore[attr-defined]
        assert find(By.ID, "status").text == "done", find(By.ID, "error").text
        # The browser's text rendering drops the trailing spaces of lines.
        shown = find(By.ID, "output").text
        assert shown.splitlines() == [x.rstrip() for x in (prompt + want).splitlines()], shown
        assert find(By.ID, "ttft").text.endswith(" ms")
        assert find(By.ID, "tokens").text == "24"
        assert float(find(By.ID, "tps").text) > 0
        assert find(By.ID, "finish").text == "length"
        # Everything the page loaded came from this server.
        urls = driver.execute_script(  # type: ignore[attr-defined]
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(server.url) for u in urls), urls
        driver.save_screenshot(str(tmp_path / "playground.png"))  # type: ignore[attr-defined]
    finally:
        server.close()
