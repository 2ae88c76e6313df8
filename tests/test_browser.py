"""The streaming page in a real headless Chromium (Selenium + Debian's chromium / chromium-driver).

The page (helios_jax/serving/static) is opened from a server on 127.0.0.1 (the bundled demo model at 64x64, 2
steps, no guidance). The test starts a t2v stream by clicking Start, waits for frames drawn on the canvas (the
frame counter rises, the pixels are not blank), changes the prompt mid-stream, sees the change acknowledged and
applied on the page while frames keep coming, stops, gets the mp4 link, and checks the browser logged no errors.
Chromium is kept off the network: its host resolver maps every name except 127.0.0.1 to nothing and background
services are off. Skipped (with the reason) only where chromium or chromedriver is not installed.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.request

import pytest

from helios_jax.serving.app import create_app
from helios_jax.serving.engine import load_engine
from helios_jax.serving.server import BackgroundServer
from helios_jax.serving.settings import ServerSettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                                else None)
NEW_PROMPT = "a white circle moves up"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Chromium and its driver: apt-get install chromium chromium-driver"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  settings = ServerSettings(steps=(2,), guidance=1.0, height=64, width=64, max_frames=330, seed=1,
                            video_dir=str(tmp_path_factory.mktemp("videos")))
  with BackgroundServer(create_app(load_engine(settings)), settings) as srv:
    yield srv


@pytest.fixture()
def browser():
  os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager is not used (explicit driver), but be sure
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
               "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
               "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-proxy-server"):
    opts.add_argument(flag)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
  driver.set_script_timeout(30)
  try:
    yield driver
  finally:
    driver.quit()


def wait(driver, condition, timeout: float, what: str):
  """Polls ``condition(stats)`` on the page's ``window.heliosPage.stats()`` until true; returns the stats."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    stats = driver.execute_script("return window.heliosPage && window.heliosPage.stats()")
    if stats and condition(stats):
      return stats
    time.sleep(0.2)
  raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last stats {stats}; page error: "
                       f"{driver.find_element('id', 'error').text!r}")


CANVAS_COLOURS = """
const c = document.getElementById('screen'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
const seen = new Set();
for (let i = 0; i < d.length; i += 4) seen.add((d[i] >> 3) * 1024 + (d[i + 1] >> 3) * 32 + (d[i + 2] >> 3));
return seen.size;
"""


def test_page_streams_and_changes_prompt(server, browser, tmp_path):
  by_id = lambda name: browser.find_element("id", name)  # noqa: E731
  browser.get(server.url + "/")
  wait(browser, lambda s: s["connected"], 30, "the WebSocket")
  assert "bundled demo model" in by_id("model-info").text and "64\u00d764" in by_id("model-info").text
  assert by_id("prompt").get_attribute("value").startswith("a purple circle")  # the bundled t2v prompt
  assert browser.execute_script(CANVAS_COLOURS) == 1  # black before the stream
  browser.execute_script("document.getElementById('endless').checked = true")
  by_id("start").click()

  stats = wait(browser, lambda s: s["drawn"] >= 5, 120, "frames drawn on the canvas")
  assert stats["streaming"] and stats["received"] >= 33
  assert browser.execute_script(CANVAS_COLOURS) > 3, "the canvas looks blank"
  assert by_id("ttff").text.endswith("s)") and "fps" in by_id("gen-fps").text

  by_id("live-prompt").send_keys(NEW_PROMPT)
  by_id("change").click()
  at_change = wait(browser, lambda s: any("accepted" in p for p in s["prompts"]), 30, "the prompt accepted")["drawn"]
  stats = wait(browser, lambda s: any("applied at chunk" in p for p in s["prompts"]), 90, "the prompt applied")
  assert NEW_PROMPT in stats["prompts"][0]
  stats = wait(browser, lambda s: s["drawn"] > at_change + 33, 90, "frames after the change")
  wait(browser, lambda s: NEW_PROMPT in browser.find_element("id", "prompt-now").text, 30, "the new prompt shown")
  shot = tmp_path / "serve_page.png"
  browser.save_screenshot(str(shot))
  assert shot.stat().st_size > 10_000
  if os.environ.get("HELIOS_SCREENSHOT"):  # where to keep a copy (docs/images/serve_page.png is made this way)
    shutil.copy(shot, os.environ["HELIOS_SCREENSHOT"])

  by_id("stop").click()
  stats = wait(browser, lambda s: s["done"] is not None, 90, "done")
  assert stats["done"]["reason"] == "stopped" and stats["done"]["frames"] >= 99
  link = by_id("download")
  assert link.is_displayed() and link.get_attribute("href").endswith(stats["done"]["video_url"])
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
  with opener.open(link.get_attribute("href"), timeout=30) as r:
    assert r.status == 200 and r.headers["content-type"] == "video/mp4" and len(r.read()) > 1000
  wait(browser, lambda s: s["drawn"] == s["done"]["frames"], 60, "playback of every frame")
  assert not by_id("start").get_property("disabled")  # ready for the next stream
  severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
  assert not severe, severe


def test_page_streams_an_uploaded_image(server, browser, tmp_path):
  """i2v with a file chosen in the page's file input (a PNG made here, not the bundled one): the upload goes over
  the socket and an i2v stream starts from it; a non-image file is refused with the server's error shown. (At 2
  steps the tiny demo's frames are too blurred to recognise the image in them: the test checks the path.)"""
  import numpy as np
  import PIL.Image

  by_id = lambda name: browser.find_element("id", name)  # noqa: E731
  image = tmp_path / "red square.png"  # a space in the name, as users' files have
  pixels = np.zeros((96, 160, 3), np.uint8)
  pixels[30:60, 40:80] = (220, 30, 30)
  PIL.Image.fromarray(pixels).save(image)
  not_image = tmp_path / "notes.png"
  not_image.write_bytes(b"this is not a PNG file")

  browser.get(server.url + "/")
  wait(browser, lambda s: s["connected"], 30, "the WebSocket")
  browser.find_element("css selector", "input[name=mode][value=i2v]").click()
  assert by_id("upload-row").is_displayed()
  by_id("upload").send_keys(str(not_image))
  by_id("start").click()
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and not by_id("error").text:
    time.sleep(0.2)
  assert "image" in by_id("error").text.lower(), by_id("error").text

  by_id("upload").send_keys(str(image))
  by_id("start").click()
  stats = wait(browser, lambda s: s["drawn"] >= 5, 120, "frames of the uploaded image's stream")
  assert stats["streaming"]
  assert "i2v" in by_id("state").text  # the server started an i2v stream from the upload
  assert not by_id("error").text  # the refusal's message is gone once a stream starts
  by_id("stop").click()
  wait(browser, lambda s: s["done"] is not None, 90, "done")
