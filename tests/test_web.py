"""The web chat page in headless Chromium: send a message, watch the reply stream in, resume the session."""
import os
import shutil

import pytest

import edge_rwkv
from edge_rwkv.cli import main as cli_main
from edge_rwkv.serve.testing import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if not CHROMIUM or not DRIVER:
    pytest.skip("headless Chromium is not installed (tests/install_browser.sh installs it)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

N_TOKENS = 12


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("web") / "tiny.safetensors"
    assert cli_main(["init", "-o", str(path), "--layers", "1", "--embd", "32", "--head-size", "32", "--seed", "21"]) == 0
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    drv = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def test_send_message_and_stream_reply(model_path, browser, tmp_path):
    m = edge_rwkv.load(model_path)
    expected = "".join(m.chat(temperature=0, max_tokens=N_TOKENS).send("Hello from the browser"))
    with ServerProcess(model_path, tmp_path / "data") as srv:
        b = browser
        b.get(srv.url + "/")
        wait = WebDriverWait(b, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "model: tiny")
        for field, value in (("temperature", "0"), ("max_tokens", str(N_TOKENS))):
            el = b.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        # count DOM updates of the reply as it streams in (records, not callbacks: a fast stream arrives in
        # one network read and its updates reach one callback)
        b.execute_script("""
            window.__updates = 0;
            new MutationObserver((records) => { window.__updates += records.length; })
              .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        """)
        b.find_element(By.ID, "input").send_keys("Hello from the browser")
        b.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
        reply = b.execute_script("return document.querySelector('.msg.assistant .text').textContent")
        assert not b.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert reply == expected
        assert b.execute_script("return window.__updates") >= 3  # user bubble, reply bubble, streamed pieces
        # the conversation is a session: it is listed, and a fresh page resumes it
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sessions li"))
        b.get(srv.url + "/")
        item = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sessions li"))[0]
        assert "Hello from the browser" in item.text
        # the fork button shows a drawn icon (no font needed), and the tab icon loads
        icon = b.execute_script("const r = document.querySelector('#sessions li button[title=fork] svg')"
                                ".getBoundingClientRect(); return [r.width, r.height];")
        assert icon == [14, 14]
        assert b.execute_async_script("const done = arguments[0]; const img = new Image(); "
                                      "img.onload = () => done(img.naturalWidth); img.onerror = () => done(0); "
                                      "img.src = '/favicon.ico';") > 0
        item.click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 2)
        texts = b.execute_script("return [...document.querySelectorAll('.msg .text')].map(e => e.textContent)")
        assert texts == ["Hello from the browser", expected]
