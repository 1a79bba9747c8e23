"""The web page in a real browser: Debian's headless Chromium, driven by Selenium, against a
real `iwae serve` (tests/web/live_server.py) whose local worker trains tiny models.

Skipped, saying why, where Chromium or chromedriver is missing; `.ci/run` installs both.
Screenshots of every view, 1280 and 375 pixels wide, go to $IWAE_SCREENSHOTS when set (else
the test's temporary folder) so that a person can look at them.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO_ROOT, TINY_JOB, wait_until
from tests.web.live_server import LiveServer

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")
WAIT_S = 20.0
JOB_WAIT_S = 120.0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(
            f"no {' or '.join(missing)}: install Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; .ci/run does) to run the browser tests"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("IWAE_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException

    # StaleElementReference: the page redrew the element, so look again.
    return wait_until(condition, what, timeout, retry_on=(StaleElementReferenceException,))


def find(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def open_page(driver: Any, server: LiveServer, view: str = "jobs") -> None:
    driver.get("about:blank")  # a new page load, even when only the #view differs
    driver.get_log("browser")  # reading the console empties it: only this page's messages count
    driver.get(f"{server.url}/#{view}" if view else f"{server.url}/")
    wait(lambda: driver.execute_script("return document.body.dataset.ready"), "the page")


def screenshot(driver: Any, shots: Path, view: str) -> None:
    """Full-height screenshots of the view shown, at 1280 and 375 pixels wide."""
    for width, name in ((1280, "desktop"), (375, "375px")):
        driver.set_window_size(width, 900)
        page_width, room = driver.execute_script(
            "const e = document.documentElement; return [e.scrollWidth, e.clientWidth];"
        )
        assert page_width <= room, f"{view} is {page_width} px wide in a {room} px window"
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(height + 140, 4000))
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(shots / f"{view}-{name}.png"))
    driver.set_window_size(1280, 900)


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_page_loads_every_view_without_console_errors(
    browser: Any, live_server: LiveServer, trained_model: str
) -> None:
    open_page(browser, live_server)
    # The form is built from the API's own schema: every field of POST /train is on it.
    fields = live_server.client.get("/openapi.json").json()["components"]["schemas"]
    for name in fields["TrainRequest"]["properties"]:
        assert find(browser, f"#train-{name}").get_attribute("name") == name
    card = wait(
        lambda: browser.find_elements("css selector", f'[data-job-id="{trained_model}"] .badge'),
        "the trained job in the list",
    )[0]
    assert card.text == "succeeded"
    for view in ("studies", "models", "try"):
        find(browser, f'nav a[href="#{view}"]').click()
        assert find(browser, f"#view-{view}").is_displayed()
        assert not find(browser, "#view-jobs").is_displayed()
    find(browser, 'nav a[href="#models"]').click()
    image = find(browser, f'[data-model-id="{trained_model}"] img')
    wait(lambda: browser.execute_script("return arguments[0].naturalWidth", image), "the samples")
    assert console_errors(browser) == []


def test_the_keyboard_reaches_the_views_with_a_visible_focus(
    browser: Any, live_server: LiveServer
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(browser, live_server, view="")  # no #view: Tab starts at the top
    focused: list[str] = []
    for _ in range(5):  # the skip link, then the views' links
        ActionChains(browser).send_keys(Keys.TAB).perform()
        focused.append(browser.switch_to.active_element.get_attribute("textContent").strip())
        outline = browser.execute_script(
            "const s = getComputedStyle(document.activeElement);"
            "return [s.outlineStyle, parseFloat(s.outlineWidth)];"
        )
        assert outline[0] == "solid" and outline[1] >= 2, (focused[-1], outline)
    assert focused == ["Skip to the content", "Jobs", "Studies", "Models", "Try it"]
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    assert find(browser, "#view-try").is_displayed()
    assert not find(browser, "#view-jobs").is_displayed()
    assert browser.switch_to.active_element.get_attribute("id") == "try-title"


def test_a_job_queued_from_the_form_asks_for_the_token_once_and_runs_to_done_on_screen(
    browser: Any, live_server: LiveServer, shots: Path
) -> None:
    open_page(browser, live_server)
    browser.execute_script("sessionStorage.clear()")
    # A second or two of training on an idle 2-core machine: long enough to be watched.
    form = {**TINY_JOB, "train_size": 5000, "latent_dim": 20, "hidden_dim": 100}
    find(browser, "#train-form details summary").click()
    for name, value in form.items():
        field = find(browser, f"#train-{name}")
        field.clear()
        field.send_keys(str(value))
    find(browser, "#train-submit").click()
    # No token yet: the API answers 401 and the page asks for one.
    dialog = wait(
        lambda: find(browser, "#token-dialog").is_displayed() and find(browser, "#token-dialog"),
        "the token dialog",
    )
    find(browser, "#token-input").send_keys("wrong")
    find(browser, "#token-save").click()
    wait(lambda: "refused" in find(browser, "#token-why").text, "the refusal")
    find(browser, "#token-input").send_keys(live_server.token)
    find(browser, "#token-save").click()
    wait(lambda: not dialog.is_displayed(), "the dialog to close")
    message = wait(
        lambda: (
            "Queued job" in find(browser, "#train-message").text
            and find(browser, "#train-message").text
        ),
        "the job to be queued",
    )
    short_id = message.split("Queued job ")[1][:8]
    job_id = next(
        j["job_id"]
        for j in live_server.client.get("/jobs").json()["jobs"]
        if j["job_id"].startswith(short_id)
    )
    card = f'[data-job-id="{job_id}"]'

    seen: list[str] = []
    progress_seen = False

    def done() -> bool:
        nonlocal progress_seen
        status = find(browser, f"{card} .badge").text
        if not seen or seen[-1] != status:
            seen.append(status)
        stats = find(browser, f"{card} .job-stats").text
        progress_seen = progress_seen or "epoch" in stats or "evaluating" in stats
        return status == "succeeded"

    wait(done, "the job to succeed on screen", JOB_WAIT_S)
    assert "running" in seen and progress_seen, seen
    assert "test log-likelihood" in find(browser, f"{card} .job-result").text
    assert live_server.client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    # The page closed its events stream on `end`, without an error: the only errors in the
    # console are the two 401s that asked for the token.
    assert browser.execute_script("return state.streams.size") == 0
    errors = [entry["message"] for entry in console_errors(browser)]
    assert len(errors) == 2 and all("/train" in e and "401" in e for e in errors), errors
    screenshot(browser, shots, "jobs")
    # Asked once: the next job is queued without a dialog, and its Cancel button cancels it.
    # It is long, so that it is still running when the cancel reaches its worker (at the next
    # heartbeat, within 10 s): on an idle machine the first job's size ends sooner.
    epochs = find(browser, "#train-epochs")
    epochs.clear()
    epochs.send_keys("200")
    find(browser, "#train-submit").click()
    wait(
        lambda: (
            find(browser, "#train-message").text.startswith("Queued job")
            and find(browser, "#train-message").text != message
        ),
        "a second job",
    )
    assert not find(browser, "#token-dialog").is_displayed()
    second_id = find(browser, "#job-list > li:first-child").get_attribute("data-job-id")
    assert second_id != job_id
    # By job id each time: the list is redrawn every few seconds.
    second = f'#job-list > li[data-job-id="{second_id}"]'
    find(browser, f"{second} .cancel").click()
    wait(lambda: find(browser, f"{second} .badge").text == "cancelled", "the cancel", JOB_WAIT_S)


def test_an_invalid_form_value_shows_the_apis_message(
    browser: Any, live_server: LiveServer
) -> None:
    open_page(browser, live_server)
    browser.execute_script(
        "sessionStorage.setItem('iwae-api-token', arguments[0])", live_server.token
    )
    find(browser, "#train-k").clear()
    find(browser, "#train-k").send_keys("0")
    find(browser, "#train-form details summary").click()
    find(browser, "#train-learning_rate").clear()
    find(browser, "#train-learning_rate").send_keys("fast")
    find(browser, "#train-submit").click()
    message = wait(
        lambda: (
            (text := find(browser, "#train-message").text).startswith("The job was not") and text
        ),
        "the error",
    )
    expected = live_server.client.post("/train", json={"k": 0, "learning_rate": "fast"}).json()
    for error in expected["detail"]:
        name = error["loc"][-1]
        assert error["msg"] in message
        assert find(browser, f"#train-{name}-error").text == error["msg"]
        assert find(browser, f"#train-{name}").get_attribute("aria-invalid") == "true"


def test_a_study_queued_from_the_form_ends_with_a_report_link(
    browser: Any, live_server: LiveServer, shots: Path
) -> None:
    open_page(browser, live_server, "studies")
    browser.execute_script(
        "sessionStorage.setItem('iwae-api-token', arguments[0])", live_server.token
    )

    def fill(**values: Any) -> None:
        for name, value in values.items():
            field = find(browser, f"#study-{name}")
            field.clear()
            field.send_keys(str(value))
        find(browser, "#study-submit").click()

    def message(prefix: str) -> str:
        return wait(
            lambda: (text := find(browser, "#study-message").text).startswith(prefix) and text,
            f"the message {prefix!r}",
        )

    # The API's own 422 message reaches the page.
    fill(ks="1 1", objectives="iwae", seeds="0", epochs=1)
    expected = live_server.client.post(
        "/studies", json={"ks": [1, 1], "objectives": ["iwae"]}
    ).json()["detail"][0]["msg"]
    assert expected in message("The study was not queued")
    # Two tiny cells, trained by the server's worker, end in a study with a report.
    fill(ks="1 2", objectives="iwae", seeds="0", epochs=1, train_size=300, eval_size=20)
    short_id = message("Queued study ").split("Queued study ")[1][:8]
    study_id = next(
        s["study_id"]
        for s in live_server.client.get("/studies").json()["studies"]
        if s["study_id"].startswith(short_id)
    )
    card = f'#study-list > li[data-study-id="{study_id}"]'
    wait(
        lambda: find(browser, f"{card} .badge").text == "succeeded",
        "the study to succeed on screen",
        JOB_WAIT_S,
    )
    assert "2 succeeded" in find(browser, f"{card} .study-cells").text
    report = find(browser, f"{card} .study-links a").get_attribute("href")
    assert report.endswith(f"/studies/{study_id}/report")
    answer = live_server.client.get(report)
    assert answer.status_code == 200 and "<img" in answer.text
    screenshot(browser, shots, "studies")


def test_two_models_side_by_side_and_new_samples(
    browser: Any, live_server: LiveServer, trained_model: str, shots: Path
) -> None:
    models = [m["model_id"] for m in live_server.client.get("/models").json()["models"]]
    if len(models) < 2:  # the form's job above is usually the second
        live_server.wait_finished(live_server.train(seed=1))
        models = [m["model_id"] for m in live_server.client.get("/models").json()["models"]]
    open_page(browser, live_server, "models")
    from selenium.webdriver.support.select import Select

    Select(find(browser, "#compare-a")).select_by_value(models[1])
    Select(find(browser, "#compare-b")).select_by_value(models[0])
    find(browser, "#compare-form button").click()
    sources = []
    for side, model_id in (("a", models[1]), ("b", models[0])):
        image = find(browser, f"#compare-img-{side}")
        wait(lambda i=image: browser.execute_script("return arguments[0].complete", i), "samples")
        assert browser.execute_script("return arguments[0].naturalWidth", image) == 242  # 8x8
        query = image.get_attribute("src").split("?", 1)[1]
        assert f"model_id={model_id}" in query and "n=64" in query
        sources.append(query)
    seeds = {query.split("seed=")[1] for query in sources}
    assert len(seeds) == 1 and seeds != {"0"}  # the same new seed on both sides
    card = find(browser, f'[data-model-id="{trained_model}"]')
    image = card.find_element("css selector", "img")
    before = image.get_attribute("src")
    card.find_element("css selector", "button").click()
    assert image.get_attribute("src") != before
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    wait(lambda: browser.execute_script(loaded, image), "the new samples")
    assert console_errors(browser) == []
    screenshot(browser, shots, "models")


def draw(browser: Any, canvas: Any, kind: str, points: list[tuple[int, int]]) -> None:
    """One stroke through `points` (relative to the canvas centre) with a mouse, pen or finger."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    actions = ActionBuilder(browser, mouse=PointerInput(kind, kind))
    (x, y), rest = points[0], points[1:]
    actions.pointer_action.move_to(canvas, x, y).pointer_down()
    for x, y in rest:
        actions.pointer_action.move_to(canvas, x, y)
    actions.pointer_action.pointer_up()
    actions.perform()


def whiteness(browser: Any, selector: str) -> float:
    """The sum of a canvas's pixel values (red channel), 0 for black, 1 for white."""
    return browser.execute_script(
        """const c = document.querySelector(arguments[0]);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i]; return s / 255;""",
        selector,
    )


def seen_pixels(browser: Any) -> list[float]:
    """The 28x28 digit the page shows as what the model sees, row-major, in [0, 1]."""
    return browser.execute_script(
        """const d = document.querySelector('#seen').getContext('2d')
             .getImageData(0, 0, 28, 28).data;
           return Array.from({length: 784}, (_, i) => d[4 * i] / 255);"""
    )


def test_a_digit_drawn_with_pointer_events_is_scored(
    browser: Any, live_server: LiveServer, trained_model: str, shots: Path
) -> None:
    open_page(browser, live_server, "try")
    pad = find(browser, "#pad")
    blank = whiteness(browser, "#pad")
    # A 7: the bar with the mouse, the stem with a pen, a serif with a finger.
    draw(browser, pad, "mouse", [(-70, -80), (0, -82), (70, -80)])
    after_mouse = whiteness(browser, "#pad")
    draw(browser, pad, "pen", [(70, -80), (30, 0), (-5, 90)])
    after_pen = whiteness(browser, "#pad")
    draw(browser, pad, "touch", [(-5, 5), (35, 5)])
    after_touch = whiteness(browser, "#pad")
    assert blank > after_mouse > after_pen > after_touch  # each stroke added ink
    find(browser, "#score").click()
    value = wait(lambda: find(browser, "#score-value").text, "the score")
    log_likelihood = float(value.replace(",", ""))
    assert math.isfinite(log_likelihood) and log_likelihood < 0
    assert whiteness(browser, "#recon") > 0  # the reconstruction is drawn
    # The 28x28 image shown is exactly what the API says the model saw.
    drawing = browser.execute_script("return document.querySelector('#pad').toDataURL()")
    png = base64.b64decode(drawing.split(",", 1)[1])
    seen = live_server.client.post(
        "/reconstruct", params={"format": "json"}, files={"file": ("d.png", png, "image/png")}
    ).json()["input"]
    assert seen_pixels(browser) == seen
    assert "test digit" in find(browser, "#score-meaning").text
    # The estimator's diagnostics are shown, and heavy tails are called out in words.
    assert "Pareto k̂" in find(browser, "#score-detail").text
    k_hat = float(find(browser, "#score-detail").text.split("Pareto k̂ ")[1].rstrip(")"))
    assert ("heavy-tailed" in find(browser, "#score-meaning").text) == (k_hat > 0.7)
    screenshot(browser, shots, "try")


def test_an_uploaded_picture_is_scored(
    browser: Any, live_server: LiveServer, trained_model: str
) -> None:
    open_page(browser, live_server, "try")
    seven = REPO_ROOT / "docs/images/seven.png"
    find(browser, "#upload").send_keys(str(seven))
    wait(lambda: whiteness(browser, "#pad") < 280 * 280, "the preview on the canvas")
    find(browser, "#score").click()
    assert math.isfinite(float(wait(lambda: find(browser, "#score-value").text, "the score")))
    # The file itself went to the API, not the canvas's preview of it.
    files = {"file": ("seven.png", seven.read_bytes(), "image/png")}
    seen = live_server.client.post("/reconstruct", params={"format": "json"}, files=files)
    assert seen_pixels(browser) == seen.json()["input"]
