"""The search page in a real browser: Debian's headless Chromium, driven by Selenium through
chromium-driver, against the real server (uvicorn on 127.0.0.1). It types a caption, presses
Enter, finds the expected picture first, clicks "More like this" and gets the other pictures,
then uploads a picture; screenshots go to the test's temporary folder (and to
$MMRET_SCREENSHOT_DIR when set: that is how `docs/serve.png` is made).

`.ci/run` installs `chromium` and `chromium-driver`; on a machine without them the test is
skipped, except in CI, where it fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mmret.data import load_dataset
from mmret.inference.search import Gallery
from mmret.serve.app import create_app
from mmret.serve.config import ServeConfig
from mmret.serve.server import LiveServer
from mmret.serve.service import SearchService

WAIT = 30  # seconds: the machine is shared, and a first page load can be slow


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        message = "needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return browser, driver


def open_browser(profile: Path, width: int = 1280, height: int = 900):
    """Headless Chromium with a fresh profile and nothing that reaches for the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def search_and_browse(url: str, caption: str, expected: str, upload: str, shots: list[Path]) -> dict:
    """What a person does on the page; returns what they saw. Screenshots after the text search
    go to each folder in `shots`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    seen: dict = {}
    with tempfile.TemporaryDirectory(prefix="mmret-chromium-") as profile:
        browser = open_browser(Path(profile))
        wait = WebDriverWait(browser, WAIT)

        def results() -> list[str]:
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
            return [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#results .hit")]

        try:
            browser.get(url)
            wait.until(ec.text_to_be_present_in_element((By.ID, "about"), "pictures"))
            box = browser.switch_to.active_element  # the search box has the focus on arrival
            assert box.get_attribute("id") == "q"
            box.send_keys(caption, Keys.ENTER)
            seen["text"] = results()
            seen["status"] = browser.find_element(By.ID, "status").text
            wait.until(lambda b: all(i.get_property("complete") and i.get_property("naturalWidth") > 0
                                     for i in b.find_elements(By.CSS_SELECTOR, "#results img")))
            seen["first_caption"] = browser.find_element(By.CSS_SELECTOR, "#results .hit .caption").text
            for folder in shots:
                folder.mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(str(folder / "serve.png"))
            browser.execute_script("document.body.dataset.state = 'waiting'")
            browser.find_element(By.CSS_SELECTOR, f'#results .hit[data-id="{expected}"] .more').click()
            seen["more"] = results()
            seen["hash"] = browser.execute_script("return location.hash")
            browser.execute_script("document.body.dataset.state = 'waiting'")
            browser.find_element(By.ID, "file").send_keys(upload)
            seen["upload"] = results()
            seen["captions_shown"] = browser.find_element(By.ID, "captions-box").is_displayed()
            browser.execute_script("document.body.dataset.state = 'waiting'")
            browser.back()  # the address held the last text search
            seen["back"] = results()
            seen["errors"] = browser.find_element(By.ID, "error").text
            browser.set_window_size(390, 844)  # a phone
            seen["phone_columns"] = browser.execute_script(
                "return getComputedStyle(document.getElementById('results')).gridTemplateColumns.split(' ').length")
            seen["phone_overflow"] = browser.execute_script(
                "return document.documentElement.scrollWidth > document.documentElement.clientWidth")
            if shots:
                browser.save_screenshot(str(shots[0] / "serve-phone.png"))
        finally:
            browser.quit()
    return seen


@pytest.fixture(scope="module")
def live(memorised):
    gallery = Gallery.open(memorised["run"], split="all", which="last")
    service = SearchService(gallery, ServeConfig(memorised["run"], which="last", k=12))
    service.warm_up()
    with LiveServer(create_app(service)) as server:
        yield server
    service.close()


def test_the_page_in_a_real_browser(live, memorised, tmp_path):
    ds = load_dataset("example", memorised["data"]).split("train")
    row = ds.items.iloc[0]
    caption = ds.captions[ds.captions.item_id == row.item_id].caption.iloc[0]
    shots = [tmp_path] + ([Path(os.environ["MMRET_SCREENSHOT_DIR"])] if os.environ.get("MMRET_SCREENSHOT_DIR") else [])
    seen = search_and_browse(live.url + "/", caption, row.item_id, str(Path(ds.items.path.iloc[1])), shots)
    assert seen["text"][0] == row.item_id and len(seen["text"]) == 12
    assert seen["status"].startswith("12 pictures for “") and caption in seen["first_caption"] + caption
    assert row.item_id not in seen["more"] and len(seen["more"]) == 11  # the other pictures of the gallery
    assert seen["hash"] == f"#id={row.item_id}"
    assert seen["upload"][0] == ds.items.item_id.iloc[1] and seen["captions_shown"]
    assert seen["back"][0] == row.item_id and seen["errors"] == ""
    assert seen["phone_columns"] == 2 and not seen["phone_overflow"]
    assert (tmp_path / "serve.png").stat().st_size > 10_000 and (tmp_path / "serve-phone.png").is_file()


def shelf(data_dir: Path) -> tuple[str, Path]:
    """A gallery `shelf` beside the memorised run's dataset: six of its pictures, a tall and a wide
    one, and three pictures whose captions differ only in case and punctuation."""
    import shutil as sh

    from PIL import Image

    from mmret.data import PrepareConfig, prepare

    root = data_dir.parent / "shelf-files"
    if not root.is_dir():
        root.mkdir()
        ds = load_dataset("example", data_dir)
        for row in ds.items.head(6).itertuples():
            sh.copy(row.path, root / f"{row.item_id}.png")
            (root / f"{row.item_id}.txt").write_text(ds.captions[ds.captions.item_id == row.item_id].caption.iloc[0])
        for name, size, colour, caption in (("tall", (24, 240), (200, 30, 40), "A strawberry."),
                                             ("berry", (60, 60), (210, 40, 40), "a strawberry"),
                                             ("berry2", (50, 70), (190, 20, 50), "A Strawberry!"),
                                             ("wide", (300, 20), (30, 60, 200), "A long blue banner.")):
            Image.new("RGB", size, colour).save(root / f"{name}.png")
            (root / f"{name}.txt").write_text(caption)
        prepare(PrepareConfig(source="folder", root=root, name="shelf", val=0.0, test=0.0, data_dir=data_dir))
    return "shelf", root


def test_the_page_fits_every_picture_and_folds_the_captions(memorised, tmp_path):
    """Thumbnails keep one height whatever the picture's shape; the captions that fit an upload are
    each said once (×3 for the three strawberries) with all but three folded away; the upload is
    shown; the page speaks of the gallery's own items and has an icon. Screenshots at a desktop's
    and a phone's width go to the test's folder."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name, root = shelf(memorised["data"])
    gallery = Gallery.open(memorised["run"], dataset=name, split="all", which="last")
    service = SearchService(gallery, ServeConfig(memorised["run"], dataset=name, which="last", k=12))
    service.warm_up()
    heights = "return [...document.querySelectorAll('#results .hit .media')].map(e => e.getBoundingClientRect().height)"
    try:
        with LiveServer(create_app(service)) as server, tempfile.TemporaryDirectory(prefix="mmret-chromium-") as p:
            browser = open_browser(Path(p))
            wait = WebDriverWait(browser, WAIT)
            try:
                browser.get(server.url + "/")
                wait.until(lambda b: "shelf" in b.find_element(By.ID, "about").text)
                icon = browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href")
                favicon = browser.execute_script("return fetch(arguments[0]).then(r => r.status + ' ' + "
                                                 "r.headers.get('content-type'))", icon)
                hint = browser.find_element(By.ID, "hint").text
                browser.find_element(By.ID, "file").send_keys(str(root / "tall.png"))
                wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
                wait.until(lambda b: all(i.get_property("complete") and i.get_property("naturalWidth") > 0
                                         for i in b.find_elements(By.CSS_SELECTOR, "#results img, #query-box img")))
                shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#captions li")]
                folded = browser.find_element(By.CSS_SELECTOR, "#more-captions summary").text
                hidden_rest = browser.find_element(By.ID, "captions-rest").is_displayed()
                query = browser.find_element(By.CSS_SELECTOR, "#query-box img")
                query_seen = (query.is_displayed(), browser.find_element(By.ID, "query-name").text)
                desktop = browser.execute_script(heights)
                browser.save_screenshot(str(tmp_path / "upload-desktop.png"))
                browser.set_window_size(390, 844)
                phone = browser.execute_script(heights)
                overflow = browser.execute_script(
                    "return document.documentElement.scrollWidth > document.documentElement.clientWidth")
                browser.save_screenshot(str(tmp_path / "upload-phone.png"))
                browser.find_element(By.CSS_SELECTOR, "#more-captions summary").click()
                rest = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#captions-rest li")]
                real_info = service.info  # the same page over a gallery of sounds speaks of sounds
                service.info = lambda: {**real_info(), "modality": "audio", "noun": "sound", "plural": "sounds"}
                browser.get(server.url + "/")
                wait.until(lambda b: b.find_element(By.ID, "file-label").text == "Search with a sound")
                sound_words = (" ".join(browser.find_element(By.ID, "hint").get_attribute("textContent").split()),
                               browser.find_element(By.ID, "file").get_attribute("accept"),
                               browser.find_element(By.ID, "q").get_attribute("placeholder"))
            finally:
                browser.quit()
    finally:
        service.close()
    assert favicon == "200 image/svg+xml"
    assert "drop a picture anywhere" in hint
    assert len(shown) == 3 and sum("strawberry" in t.lower() for t in shown + rest) == 1
    berry = next(t for t in shown + rest if "strawberry" in t.lower())
    assert "×3" in berry, berry
    assert folded == f"{len(rest)} more captions" and rest and not hidden_rest
    assert len(shown) + len(rest) == 10 - 2  # ten captions, the three strawberries one suggestion
    assert query_seen == (True, "Searching with tall.png")
    assert len(desktop) == 10 and set(desktop) == {170}, desktop  # the tall and the wide picture fit the same box
    assert len(phone) == 10 and set(phone) == {140} and not overflow, phone
    assert sound_words == ("Type a caption and press Enter, or drop a sound anywhere on the page. Press / to come "
                           "back to the search box.", "audio/*", "Describe a sound, press Enter")
    assert (tmp_path / "upload-desktop.png").stat().st_size > 10_000 and (tmp_path / "upload-phone.png").is_file()
