"""The dashboard in a real browser: headless Chromium driven by Selenium.

An embedded broker with dead letters is served by ``AdminServer``; the test opens the
dashboard, finds the queue, opens its dead-letter queue, replays one letter with its
button, waits for the success message, and checks through the library that the letter
left the DLQ and is back in the queue. A screenshot is saved as
``dashboard-dlq-replay.png`` in ``$ARRIVAL_SCREENSHOT_DIR`` (default: the test's tmp dir).

The browser is Debian's ``chromium`` and ``chromium-driver``; Selenium is given both
paths, so it never downloads anything. Without them the test is skipped locally and
fails under CI (``$CI`` set), where ``.ci/run`` installs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

import arrival
from arrival.admin import AdminServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 15.0  # page load, a poll and a replay, on a loaded machine
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,800",
)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[WebDriver]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        reason = f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the browser test must run there)", pytrace=False)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[arrival.Broker]:
    b = arrival.connect(str(tmp_path / "data"))
    b.create_queue("orders", "at-least-once", max_deliveries=3)
    b.create_queue("prices", "at-most-once", capacity=100, conflate=True)
    producer = b.producer()
    for i in range(3):
        producer.send(
            "orders", f'{{"order": {i}, "note": "<b>not markup</b>"}}'.encode(), id=f"o-{i}"
        )
    producer.send("orders", b'{"order": 99}', id="o-99")
    consumer = b.consumer("orders", group="billing")
    for i in range(3):
        msg = consumer.receive(timeout=5)
        assert msg is not None
        msg.reject(f"<script>alert({i})</script> malformed order")
    consumer.close()
    b.engine.flush().wait()  # the letters are in the DLQ once the writer committed them
    yield b
    b.close()


def screenshot_path(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("ARRIVAL_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "dashboard-dlq-replay.png"


def test_replay_a_dead_letter_from_the_dashboard(
    driver: WebDriver, broker: arrival.Broker, tmp_path: Path
) -> None:
    letters = broker.dead_letters("orders").list()
    assert [d.id for d in letters] == ["o-0", "o-1", "o-2"]
    target = letters[1]

    with AdminServer(broker, "127.0.0.1:0") as admin:
        # the page re-renders as it polls: look elements up again rather than keep them
        wait = WebDriverWait(driver, WAIT_S, ignored_exceptions=[StaleElementReferenceException])
        driver.get(admin.url)
        dlq_button = (By.CSS_SELECTOR, 'tbody[data-queue="orders"] button[data-action="dlq"]')

        # the queue row, with its guarantee and its dead-letter count
        row = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, 'tbody[data-queue="orders"]'))
        )
        assert "at-least-once" in row.text
        assert "billing" in row.text
        wait.until(ec.text_to_be_present_in_element(dlq_button, "3 letters"))
        assert "prices" in driver.find_element(By.ID, "queues").text

        # open the DLQ: each letter with its provenance, shown as text, never as markup
        wait.until(ec.element_to_be_clickable(dlq_button)).click()
        letter = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-letter="{target.offset}"]'))
        )
        assert "<script>alert(1)</script> malformed order" in letter.text
        assert "billing" in letter.text
        assert '"<b>not markup</b>"' in letter.text
        assert driver.find_elements(By.CSS_SELECTOR, "#letters b, #letters script") == []

        # replay one letter and see the success message
        letter.find_element(By.CSS_SELECTOR, "button.replay").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "result"), "Replayed 1 message"))
        result = driver.find_element(By.ID, "result")
        assert "ok" in (result.get_attribute("class") or "")
        assert "group billing" in result.text
        wait.until(
            ec.invisibility_of_element_located(
                (By.CSS_SELECTOR, f'tr[data-letter="{target.offset}"]')
            )
        )
        wait.until(ec.text_to_be_present_in_element(dlq_button, "2 letters"))
        path = screenshot_path(tmp_path)
        assert driver.save_screenshot(str(path))
        print(f"dashboard screenshot: {path}")
        assert path.stat().st_size > 0

    # the library agrees: the letter left the DLQ and is back in the queue for billing
    assert [d.id for d in broker.dead_letters("orders").list()] == ["o-0", "o-2"]
    again = broker.consumer("orders", group="billing")
    got = []
    while (msg := again.receive(timeout=0)) is not None:
        got.append(msg)
        msg.ack()
    assert [m.id for m in got] == ["o-99", target.id]
    assert got[1].body == target.body
    assert got[1].attempt == 1  # a fresh budget


def test_a_replay_asks_for_the_token_when_the_server_has_one(
    driver: WebDriver, broker: arrival.Broker
) -> None:
    first = broker.dead_letters("orders").list()[0]
    with AdminServer(broker, "127.0.0.1:0", token="s3cret") as admin:
        wait = WebDriverWait(driver, WAIT_S, ignored_exceptions=[StaleElementReferenceException])
        driver.get(admin.url)
        dlq_button = (By.CSS_SELECTOR, 'tbody[data-queue="orders"] button[data-action="dlq"]')
        wait.until(ec.element_to_be_clickable(dlq_button)).click()
        replay = (By.CSS_SELECTOR, f'tr[data-letter="{first.offset}"] button.replay')
        wait.until(ec.element_to_be_clickable(replay)).click()

        # refused without the token: the page says so and asks for it
        wait.until(ec.text_to_be_present_in_element((By.ID, "result"), "Replay failed"))
        assert "bad" in (driver.find_element(By.ID, "result").get_attribute("class") or "")
        field = wait.until(ec.visibility_of_element_located((By.ID, "token")))
        assert len(broker.dead_letters("orders").list()) == 3

        # given the token, the same replay is sent again and succeeds
        field.send_keys("s3cret")
        driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "result"), "Replayed 1 message"))
        assert not driver.find_element(By.ID, "token-form").is_displayed()
    assert first.id not in [d.id for d in broker.dead_letters("orders").list()]
