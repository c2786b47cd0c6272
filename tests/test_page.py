"""The page served at ``/`` (serve_app/ui), driven in headless Chromium against a real ``slimray serve`` graph:
intent, entity and sentiment models, knowledge index, generator and monitor, with an API token.

The token flow is checked against the ingress app under uvicorn (a running cluster's token is its own
setting). Chromium and its driver are Debian's (``chromium``, ``chromium-driver``; tests/run.sh installs them), driven
through Selenium. Set ``SLIMRAY_SCREENSHOTS=DIR`` to keep the screenshots (the README's come from here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TOKEN = "page-test-token"
MESSAGE = "is there a Monzo branch in Oslo?"  # a tagger training template (a location); about branches
STORED = ' <img src=x onerror="window.__xss = 3">'  # in the texts the alert cites as evidence
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">hello'


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        missing = "Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"the page test needs {missing}; tests/run.sh installs them")
        pytest.skip(f"needs {missing}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,820",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def served(ray_session, finetuned, finetuned_tagger, tiny_sentiment, tiny_causal_lm, tmp_path_factory):
    import httpx
    from ray import serve

    from raycluster import free_port  # tests/raycluster.py
    from serve_app.app import AppArgs
    from serve_app.run import deploy
    from test_monitor import LIVE_RULE, _news
    from test_rag import write_docs
    from jobs.knowledge import IndexConfig, main as index_main

    tmp = tmp_path_factory.mktemp("page")
    docs = write_docs(tmp / "docs")
    (docs / "branches.md").write_text("# Branches\n\n## Oslo\nOur Monzo branch in Oslo opens 9am to 4pm.\n")
    index_main(IndexConfig(docs=docs, out=tmp / "kb"))
    playbook = tmp / "playbook.yaml"
    playbook.write_text("default: A colleague will reply.\nintents: {}\n")
    args = AppArgs(model=str(finetuned), entity_model=str(finetuned_tagger), sentiment_model=str(tiny_sentiment),
                   monitor_store=f"sqlite:///{tmp / 'monitor.db'}", alerting=LIVE_RULE, index=str(tmp / "kb"),
                   generator=str(tiny_causal_lm), playbook=str(playbook), default_threshold=1.0, max_new_tokens=12)
    url = deploy(args, port=free_port(), deployments={  # every model type on the test's 2 CPUs
        name: {"ray_actor_options": {"num_cpus": 0.2}, "autoscaling_config": None, "num_replicas": 1}
        for name in ("Model", "EntityModel", "SentimentModel", "Generator")})
    surge = [{**it, "text": it["text"] + STORED} for it in _news("acme", range(3, 4), "negative", 8, 100)]
    items = _news("acme", range(3), "positive", 8, 0) + surge + _news("globex", range(4), "neutral", 6, 0)
    r = httpx.post(f"{url}/v1/observations", json={"items": items}, timeout=120)
    assert r.status_code == 200, r.text
    yield url
    serve.shutdown()


def shot(driver, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("SLIMRAY_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(folder / f"page-{name}.png"))


def test_the_page_streams_a_reply_with_intent_entities_and_citations_and_shows_untrusted_text_as_text(
        browser, served, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url = served
    wait = WebDriverWait(browser, 120)
    browser.get(url + "/")
    assert browser.title == "slimray assistant"
    expected = httpx.post(f"{url}/v1/assist", json={"message": MESSAGE}, timeout=120).json()
    assert expected["source"] == "generated" and expected["citations"], expected
    browser.find_element(By.ID, "message").send_keys(MESSAGE + "\n")
    meta = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#messages li.assistant .meta")))
    reply = browser.find_element(By.CSS_SELECTOR, "#messages li.assistant")
    assert "generated" in reply.get_attribute("class")
    assert reply.find_element(By.CSS_SELECTOR, ".text").text == expected["reply"].strip()
    assert meta.find_element(By.CSS_SELECTOR, ".intent b").text == expected["intent"]
    assert f"{100 * expected['confidence']:.1f}%" in meta.text
    cited = [li.get_attribute("data-id") for li in reply.find_elements(By.CSS_SELECTOR, ".citations li")]
    assert cited == [c["id"] for c in expected["citations"]]
    marks = browser.find_elements(By.CSS_SELECTOR, "#messages li.user mark.entity")
    places = [e for e in expected["entities"] if e["type"] == "location"]
    assert places and [m.get_attribute("data-type") for m in marks] == [e["type"] for e in expected["entities"]]
    assert any(m.text.startswith(e["text"]) for m in marks for e in places)  # the mark holds the entity's text
    shot(browser, "chat", tmp_path)

    browser.find_element(By.ID, "message").send_keys(HOSTILE + "\n")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages li.assistant .meta")) == 2)
    shown = browser.execute_script(  # the message's text, without the type labels of marked entities
        "const p = [...document.querySelectorAll('#messages li.user .text')].pop().cloneNode(true);"
        "p.querySelectorAll('small').forEach(x => x.remove()); return p.textContent;")
    assert shown == HOSTILE  # shown as typed
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages script, #messages img")
    assert browser.execute_script("return window.__xss") is None


def test_the_page_shows_the_served_versions_and_the_monitor_with_its_alerts(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="models"]').click()
    cells = wait.until(lambda d: d.execute_script(  # read in one call: the tab may render twice (page load, click)
        "return [...document.querySelectorAll('#versions tbody td')].map(td => td.textContent)"))
    assert cells[1:3] == ["primary", "100.0%"]
    served_text = browser.execute_script("return document.getElementById('served').textContent")
    assert "transformers" in served_text  # the generator's backend

    monitor = browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="monitor"]')
    assert monitor.is_displayed()  # a sentiment model is served
    monitor.click()
    # The monitor re-renders every 5 s: read it in one script call, never through elements held across renders.
    snapshot = ("return {topics: [...document.querySelectorAll('#topics tbody button')].map(b => b.textContent),"
                " alerts: [...document.querySelectorAll('#alerts > li')].map(li => ({text: li.textContent,"
                "   examples: [...li.querySelectorAll('.examples li')].map(x => x.textContent)})),"
                " lines: document.querySelectorAll('#trend polyline').length,"
                " windows: document.querySelectorAll('#trend rect.alert').length}")
    seen = wait.until(lambda d: (lambda v: v if v["alerts"] and v["lines"] == 3 else None)(d.execute_script(snapshot)))
    assert seen["topics"] == ["acme", "globex"]
    assert "acme" in seen["alerts"][0]["text"] and "of 8 negative" in seen["alerts"][0]["text"]
    examples = seen["alerts"][0]["examples"]  # the evidence: example texts, shown as stored, not run
    assert examples and all(e.endswith(STORED.strip()) for e in examples)
    assert seen["windows"] >= 1  # the alert window marked on the trend
    shot(browser, "monitor", tmp_path)
    browser.execute_script(  # found and clicked in one call: the table may re-render in between otherwise
        "[...document.querySelectorAll('#topics tbody button')].find(b => b.textContent === 'globex').click()")
    wait.until(ec.text_to_be_present_in_element((By.ID, "trend-title"), "globex"))
    assert browser.execute_script("return window.__xss") is None and not browser.find_elements(
        By.CSS_SELECTOR, "#alerts img")


def test_the_page_asks_for_the_api_token_once_and_keeps_it_in_the_tab(browser):
    """The page against the real ingress app (``make_api``) with a token, served by uvicorn: the first 401 shows
    the token form; the token entered there is sent with every call and kept in sessionStorage. (The graph
    above has no token: on a running cluster the token is the cluster's own setting.)"""
    import threading

    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from raycluster import free_port
    from serve_app.api import make_api
    from serve_app.assistant import Playbook

    class Described:  # the model side answers only /v1/models here
        async def describe(self) -> dict:
            return {"versions": [{"version": "v7", "role": "primary", "traffic_fraction": 1.0,
                                  "handoff_threshold": 0.42, "backend": "onnx"}], "routing": {"canary_fraction": 0}}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_api(Described(), Playbook(), api_token=TOKEN, intents=False),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: server.started)
        browser.get(f"http://127.0.0.1:{port}/#models")
        browser.execute_script("sessionStorage.clear()")
        browser.refresh()
        wait.until(ec.visibility_of_element_located((By.ID, "auth")))
        assert "API token" in browser.find_element(By.ID, "notice").text
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#auth button").click()
        wait.until(ec.invisibility_of_element_located((By.ID, "auth")))
        browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="models"]').click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#versions tbody tr"))
        assert [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#versions tbody td")] == [
            "v7", "primary", "100.0%", "0.420", "onnx"]
        assert browser.execute_script("return sessionStorage.getItem('slimray-api-token')") == TOKEN
        browser.refresh()  # kept in the tab: no second prompt
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
        assert not browser.find_element(By.ID, "auth").is_displayed()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_the_graph_with_index_and_generator_searches_generates_streams_and_hands_off(served):
    """The knowledge path through the same graph, over the API (``test_rag.check_knowledge_graph``; its docs are
    ``write_docs``'s and one more; tests/test_rag.py has the llama.cpp backend's)."""
    from test_rag import check_knowledge_graph

    check_knowledge_graph(served, 10, "transformers", 12)  # write_docs's 9 passages and branches.md's
