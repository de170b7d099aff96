"""The feature browser in a real browser (issue 18): headless Chromium (Debian's `chromium` and
`chromium-driver`, which `make test` installs) drives a site built for a tiny model, opened
from disk with no network. Screenshots land in the test's temp dir (``screenshots/``)."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from saeguard.cli import main
from saeguard.sae import SAEConfig, create_sae
from saeguard.sae.io import save_sae
from tests.conftest import WORDS
from tests.unit.test_browse import HOSTILE, _corpus

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def built(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random SAE on the tiny llama, its browse site, and an OOD benchmark linking into it."""
    root = tmp_path_factory.mktemp("browser")
    corpus = _corpus(root / "corpus.txt")  # word salad plus texts carrying <script> and onerror=
    more = [" ".join(random.Random(i).choices(WORDS, k=30)) + "." for i in range(400)]
    corpus.write_text(corpus.read_text() + "\n\n" + "\n\n".join(more))  # enough to calibrate
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    meta = {"model": str(tiny_llama_dir), "hook": "resid_post.2", "corpus": str(corpus),
            "ctx_len": 32}  # fmt: skip
    save_sae(sae, root / "sae", meta)
    site, mon, bench = root / "site", root / "mon", root / "bench"
    assert main(["-q", "browse", str(root / "sae"), "--out", str(site), "--device", "cpu",
                 "--top-k", "5"]) == 0  # fmt: skip
    assert main(["-q", "ood", "fit", str(root / "sae"), "--out", str(mon), "--fit-texts", "60",
                 "--calibration-texts", "40", "--no-fused-with-lm", "--target-fpr", "0.2",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert main(["-q", "ood", "benchmark", "--monitor", str(mon), "--out", str(bench),
                 "--shifts", "typos:0.2", "--id-texts", "20", "--per-shift", "20",
                 "--no-lm-baselines", "--resamples", "100", "--site", str(site),
                 "--device", "cpu"]) == 0  # fmt: skip
    return {"root": root, "site": site, "bench": bench}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver on PATH: run "
            "`bash scripts/install_browser.sh` (make test does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--disable-background-networking",
                 "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.shots = tmp_path_factory.mktemp("screenshots")  # type: ignore[attr-defined]
    yield driver
    driver.quit()


def _open(driver: Any, page: Path, query: str = "") -> None:
    driver.get(page.resolve().as_uri() + query)


def _wait(driver: Any, css: str, at_least: int = 1) -> list[Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d: Any) -> list[Any] | bool:
        elements = d.find_elements(By.CSS_SELECTOR, css)
        return elements if len(elements) >= at_least else False

    result: list[Any] = WebDriverWait(driver, 30).until(found)
    return result


def _no_console_errors(driver: Any) -> None:
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def _shoot(driver: Any, name: str) -> None:
    path = driver.shots / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 1000


def _order(driver: Any) -> list[int]:
    return [int(r.get_attribute("data-latent")) for r in _wait(driver, "#latents tbody tr")]


def test_the_index_renders_every_latent_and_sorting_and_search_change_the_rows(
    built: dict[str, Path], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, built["site"] / "index.html")
    rows = _wait(browser, "#latents tbody tr", 64)
    assert len(rows) == 64  # d_sae latents, one page of 100
    summary = json.loads((built["site"] / "browse.json").read_text())
    assert browser.find_element(By.ID, "count").text.startswith("64 of 64")
    before = _order(browser)
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="count"]').click()
    first = _order(browser)
    counts = [
        int(browser.find_element(By.CSS_SELECTOR, f'tr[data-latent="{i}"] td[data-col="count"]')
            .text.replace(",", ""))
        for i in first
    ]  # fmt: skip
    assert first != before and counts in (sorted(counts), sorted(counts, reverse=True))
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="count"]').click()  # the other way
    assert _order(browser) != first
    search = browser.find_element(By.ID, "search")
    search.send_keys("#7")
    assert _order(browser) == [7]
    search.clear()
    search.send_keys("river")  # a token of the corpus: only latents whose tokens match
    matching = _order(browser)
    assert 0 < len(matching) < 64
    _shoot(browser, "index")
    _no_console_errors(browser)
    assert summary["d_sae"] == 64


def test_a_latent_page_shows_highlighted_tokens_and_a_histogram(
    built: dict[str, Path], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    index = (built["site"] / "data" / "index.js").read_text()
    rows = json.loads(index[index.index("=") + 1 :].strip().rstrip(";"))["rows"]
    busiest = max(range(len(rows)), key=lambda i: rows[i][0] if isinstance(rows[i], list) else 0)
    _open(browser, built["site"] / "latent.html", f"?i={busiest}")
    tokens = _wait(browser, "#contexts .tok[data-act]")
    lit = [t for t in tokens if t.get_attribute("data-act")]
    assert lit and all(t.get_attribute("title") for t in lit)  # value in the tooltip
    assert browser.find_element(By.ID, "title").text == f"Latent {busiest}"
    bars = _wait(browser, "#histogram rect.bar")
    assert sum(int(b.get_attribute("data-count")) for b in bars) > 0
    _shoot(browser, "latent")
    _no_console_errors(browser)


def test_an_alarm_links_to_its_latent_page(built: dict[str, Path], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, built["bench"] / "examples.html")
    links = _wait(browser, "a[href*='latent.html?i=']")
    target = links[0].get_attribute("href")
    latent = int(target.rsplit("=", 1)[1])
    links[0].click()
    _wait(browser, "#contexts")
    assert browser.current_url.endswith(f"latent.html?i={latent}")
    assert browser.find_element(By.ID, "title").text == f"Latent {latent}"
    _shoot(browser, "from-alarm")
    _no_console_errors(browser)


def test_hostile_corpus_text_is_shown_as_text_and_never_runs(
    built: dict[str, Path], browser: Any
) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    for page in ("index.html", "texts.html", "latent.html"):
        _open(browser, built["site"] / page, "?i=0" if page == "latent.html" else "")
        _wait(browser, "main")
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - an alert would mean a script ran
        injected = browser.execute_script(
            "return document.querySelectorAll('img[src=\"x\"], script:not([src])').length"
        )
        assert injected == 0
        _no_console_errors(browser)
    # The texts page shows the hostile strings as text.
    _open(browser, built["site"] / "texts.html")
    _wait(browser, "#texts .text")
    shown = browser.execute_script("return document.getElementById('texts').textContent")
    assert any(h in shown for h in HOSTILE)
    _shoot(browser, "texts")


def test_the_live_view_of_a_served_site_shows_token_latents_linked_to_their_pages(
    built: dict[str, Path], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    from saeguard.ood import Monitor
    from saeguard.serve.app import create_app
    from tests.unit.test_serve import Server

    server = Server(create_app(Monitor.load(built["root"] / "mon"), site=built["site"]))
    try:
        browser.get(server.url + "/live")
        box = browser.find_element(By.ID, "text")
        box.send_keys("zebra quilt xylophone river " * 4 + HOSTILE[0])
        browser.find_element(By.ID, "go").click()
        tokens = _wait(browser, "#tokens .tok", 8)
        assert HOSTILE[0] in browser.find_element(By.ID, "tokens").text  # shown as text
        assert browser.find_element(By.ID, "flag").text.split(":")[0] in ("FLAGGED", "not flagged")
        links = []
        for token in tokens:  # the first token with fallacious latents lists them, linked
            token.click()
            links = browser.find_elements(By.CSS_SELECTOR, "#latents table a")
            if links:
                break
        assert links, "no token of an out-of-distribution text had a fallacious latent"
        latent = int(links[0].get_attribute("href").rsplit("=", 1)[1])
        links[0].click()
        _wait(browser, "#contexts")
        assert browser.find_element(By.ID, "title").text == f"Latent {latent}"
        assert "/browse/latent.html" in browser.current_url
        _shoot(browser, "live-to-latent")
        _no_console_errors(browser)
    finally:
        server.stop()
