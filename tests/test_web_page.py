"""The search page in a real browser: Debian's chromium, driven by Playwright, against `clipseek serve`.

`.ci/run` installs chromium; on a machine without it these tests are skipped with the reason.
"""

import shutil

import pytest

from tests.http_server import demo_index, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
# Without the background-networking switches chromium keeps dialling Google's hosts, which this
# offline machine refuses; --no-sandbox because tests may run as root.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "page-token"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    scenes = demo_index(root)
    with serving(root / "index", "--token", TOKEN) as url:
        yield url, scenes


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept(TOKEN))  # the page asks for the token once
    yield page
    page.screenshot(path=tmp_path / "page.png")
    context.close()


def hits(page) -> list[dict]:
    """The result cards once every thumbnail has loaded."""
    page.wait_for_selector(".hit")
    page.wait_for_function(
        "document.querySelectorAll('.hit img[src]').length === document.querySelectorAll('.hit').length"
    )
    return page.eval_on_selector_all(".hit", "cards => cards.map(c => ({...c.dataset}))")


def test_typing_a_query_shows_the_right_pictures(page, site):
    url, scenes = site
    page.goto(url)
    page.fill("#text", "a large red circle")
    page.press("#text", "Enter")
    shown = hits(page)
    assert len(shown) == 24
    top = [scenes[hit["path"]] for hit in shown[:3]]
    assert [(scene.colour, scene.shape) for scene in top] == [("red", "circle")] * 3
    assert [float(hit["score"]) for hit in shown] == sorted((float(hit["score"]) for hit in shown), reverse=True)
    assert page.text_content("#status") == "results 1–24"

    page.click(".hit >> nth=0")  # the full picture and its metadata
    page.wait_for_selector("#detail-image[src]")
    assert shown[0]["path"] in page.text_content("#detail-metadata")
    assert page.eval_on_selector("#detail-image", "image => image.naturalWidth") > 0


def test_paging_and_a_bookmarkable_address(page, site):
    url, _ = site
    page.goto(f"{url}/?q=a+blue+star")
    first = hits(page)
    assert len(first) == 24
    page.click("#next")
    page.wait_for_function("document.querySelector('#status').textContent === 'results 25–48'")
    second = hits(page)
    assert not {hit["id"] for hit in first} & {hit["id"] for hit in second}
    assert float(first[-1]["score"]) >= float(second[0]["score"])
    page.click("#next")
    page.wait_for_function("document.querySelector('#status').textContent === 'results 49–60'")
    assert page.is_disabled("#next") and not page.is_disabled("#previous")


def test_searching_with_an_uploaded_picture(page, site):
    url, scenes = site
    picture = next(path for path in scenes if path.endswith(".png"))
    page.goto(url)
    page.set_input_files("#file", picture)
    shown = hits(page)
    assert shown[0]["path"] == picture and float(shown[0]["score"]) == pytest.approx(1, abs=1e-3)
