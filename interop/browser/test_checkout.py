"""Sealed card collection in a real browser: headless Chromium, driven by
Selenium through ChromeDriver, against `cardvault dev` and the demo shop.

The shopper types a card into the card fields (an iframe from the fields
origin); the checkout page gets a sealed string and the shop's backend
relays it to TokenizeSealed. The tests check the token reads back to the
card as the processor, that the backend's request log holds no card digits
and no CVV, that script on the checkout page cannot read the fields, that
a bad card number shows its field error in the page, and that collect.js
passes RFC 9180's vectors in the browser.

Environment:
  CARDVAULT_BIN   the cardvault binary (required)
  DEMO_SHOP_BIN   the demo shop example binary (required)
  ARTIFACTS_DIR   where the screenshot goes (default: target/browser-artifacts)
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import threading
import time

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

REPO = pathlib.Path(__file__).resolve().parents[2]
PAN = "4242424242424242"
CVV = "947"
NAME = "Ada Lovelace"
EXPIRY = "12/" + str((time.gmtime().tm_year + 3) % 100)
WAIT = 20


def start(cmd, ready_prefix, env=None, log=None):
    """Starts a process and waits for the stdout line starting with `ready_prefix`."""
    err = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    found = {}
    ready = threading.Event()

    def pump():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if "line" not in found and line.startswith(ready_prefix):
                found["line"] = line
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(60) or "line" not in found:
        proc.kill()
        pytest.fail(f"{cmd[0]} did not start" + (f":\n{pathlib.Path(log).read_text(errors='replace')}" if log else ""))
    return proc, found["line"]


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    vault_bin = os.environ.get("CARDVAULT_BIN")
    shop_bin = os.environ.get("DEMO_SHOP_BIN")
    if not vault_bin or not shop_bin:
        pytest.fail("set CARDVAULT_BIN and DEMO_SHOP_BIN")
    base = tmp_path_factory.mktemp("stack")
    data = base / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDVAULT_")}
    env["CARDVAULT_LOG"] = "info"
    vault, line = start([vault_bin, "dev", "--listen", "127.0.0.1:0", "--data-dir", str(data)],
                        "cardvault listening on ", env, base / "vault.log")
    port = int(line.rsplit(":", 1)[1])
    addr = f"https://localhost:{port}"
    shop_log = base / "shop-requests.log"
    shop, line = start([shop_bin, "--addr", addr, "--dev-dir", str(data), "--shop", "127.0.0.1:0",
                        "--fields", "127.0.0.1:0", "--log", str(shop_log), "--web", str(REPO / "web"),
                        "--test-pages"], "demo shop: checkout ", env, base / "shop.log")
    m = re.match(r"demo shop: checkout (\S+)/ +\(card fields served from (\S+)\)", line)
    assert m, line
    try:
        yield {"vault_bin": vault_bin, "addr": addr, "data": data, "shop": m.group(1), "fields": m.group(2),
               "shop_log": shop_log, "shop_stdout": base / "shop.log", "vault_log": base / "vault.log"}
    finally:
        stop(shop)
        stop(vault)


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=600,900",
              "--disable-gpu", "--no-first-run"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")),
                              options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def open_checkout(driver, stack):
    driver.switch_to.default_content()
    driver.get(stack["shop"] + "/")
    WebDriverWait(driver, WAIT).until(EC.element_to_be_clickable((By.ID, "pay")))


def type_card(driver, number, expiry=EXPIRY, cvc=CVV, name=NAME):
    frame = driver.find_element(By.ID, "card-frame")
    driver.switch_to.frame(frame)
    for field, value in (("cv-number", number), ("cv-expiry", expiry), ("cv-cvc", cvc), ("cv-name", name)):
        el = driver.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    driver.switch_to.default_content()


def detokenize(stack, token):
    out = subprocess.run([stack["vault_bin"], "--addr", stack["addr"], "--dev-dir", str(stack["data"]),
                          "--as", "processor", "detokenize", token, "--purpose", "browser test"],
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def test_collect_js_passes_rfc9180_vectors_in_the_browser(browser, stack):
    browser.switch_to.default_content()
    browser.get(stack["fields"] + "/test/vectors.html")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "result").text != "running")
    verdict = browser.find_element(By.ID, "result").text
    assert verdict.startswith("PASS"), verdict


def test_a_card_typed_in_the_fields_is_tokenized_without_the_shop_seeing_it(browser, stack):
    open_checkout(browser, stack)
    type_card(browser, PAN)
    # The number is formatted in the field as it is typed.
    browser.switch_to.frame(browser.find_element(By.ID, "card-frame"))
    assert browser.find_element(By.ID, "cv-number").get_attribute("value") == "4242 4242 4242 4242"
    assert browser.find_element(By.ID, "cv-brand").text.lower() == "visa"
    browser.switch_to.default_content()
    artifacts = pathlib.Path(os.environ.get("ARTIFACTS_DIR", REPO / "target" / "browser-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(artifacts / "checkout-filled.png"))

    browser.find_element(By.ID, "pay").click()
    WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.ID, "result").get_attribute("data-token")
        or d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    token = browser.find_element(By.ID, "result").get_attribute("data-token")
    assert token.startswith("tok_"), token
    browser.save_screenshot(str(artifacts / "checkout-paid.png"))

    card = detokenize(stack, token)
    assert card["pan"] == PAN
    assert card["cardholder_name"] == NAME

    # Nothing the shop's backend received or logged holds the card.
    log = stack["shop_log"].read_text()
    shop_out = stack["shop_stdout"].read_text(errors="replace")
    bodies = [json.loads(line) for line in log.splitlines()]
    assert any(b["path"] == "/pay" for b in bodies), log
    for text in (log, shop_out):
        assert PAN not in text
        assert not re.search(r"(?<![\w-])(?:\d[ -]?){13,19}(?![\w-])", text), "card-like digits in the shop's log"
    for b in bodies:
        if b["body"]:
            sent = json.loads(b["body"])
            assert set(sent) <= {"session_id", "sealed"}, sent
            assert CVV not in sent.values() and PAN not in sent.values()
            assert "cvv" not in b["body"] and "pan" not in b["body"]
    assert PAN not in stack["vault_log"].read_text(errors="replace")


def test_merchant_page_script_cannot_read_the_fields(browser, stack):
    open_checkout(browser, stack)
    type_card(browser, PAN)
    outcome = browser.execute_script("""
        const frame = document.getElementById('card-frame');
        try {
            return 'read: ' + frame.contentWindow.document.getElementById('cv-number').value;
        } catch (e) {
            return 'blocked: ' + e.name;
        }
    """)
    assert outcome == "blocked: SecurityError", outcome
    # contentDocument of a cross-origin frame is null: nothing to read.
    outcome = browser.execute_script("""
        return String(document.getElementById('card-frame').contentDocument);
    """)
    assert outcome == "null", outcome


def test_a_bad_card_number_shows_its_field_error_in_the_page(browser, stack):
    open_checkout(browser, stack)
    type_card(browser, "4242424242424241")
    browser.find_element(By.ID, "pay").click()
    try:
        WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "error").text)
    except TimeoutException:
        pytest.fail("no error shown for a card number that fails the check")
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("Card number fails the check"), error
    assert "4242" not in error
    assert not browser.find_element(By.ID, "result").get_attribute("data-token")
    browser.switch_to.frame(browser.find_element(By.ID, "card-frame"))
    assert "fails the check" in browser.find_element(By.ID, "cv-number-error").text
    browser.switch_to.default_content()


def test_the_fields_page_refuses_other_embedders_and_is_served_with_a_strict_policy(browser, stack):
    # Opened on its own (not embedded), the fields page draws no fields.
    browser.switch_to.default_content()
    browser.get(stack["fields"] + "/fields.html?origin=" + stack["shop"])
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "card").text)
    assert "unavailable" in browser.find_element(By.ID, "card").text
    assert not browser.find_elements(By.ID, "cv-number")
    import urllib.request
    with urllib.request.urlopen(stack["fields"] + "/fields.html") as r:
        csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and f"frame-ancestors {stack['shop']}" in csp, csp
    assert "default-src 'none'" in csp
