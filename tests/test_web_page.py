"""The web chat page at / of `xiaolm serve`, in a real headless Chromium against the real server and a tiny model."""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.browser import chromium_page, save_screenshot
from tests.test_export import make_run_dir
from tests.test_llama import large_init
from xiaolm.model.export import export_hf
from xiaolm.model.llama import Llama, LlamaConfig

PAGE = Path(__file__).parents[1] / "src" / "xiaolm" / "infer" / "static" / "chat.html"
API_KEY = "test-key"
SYSTEM = "你是一个乐于助人的助手。"
QUESTIONS = ["你好，请介绍一下你自己。", "请写一首关于春天的诗。", "谢谢！"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, *args: str, timeout: float = 90) -> Iterator[str]:
    """`xiaolm serve MODEL` in a subprocess on a free port; yields its base URL once GET /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "xiaolm", "serve", str(model_dir), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"xiaolm serve exited with {proc.returncode}:\n{proc.stdout.read()}", pytrace=False)
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"xiaolm serve did not answer {url}/health within {timeout:.0f} s", pytrace=False)
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random 2-layer model with a 16k-token context that never picks a special token, so a reply runs until
    max_tokens or the stop button (garbage text, but real tokens streamed by the real server: ~500 tokens/s)."""
    from xiaolm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = large_init(Llama(LlamaConfig(vocab_size=len(tokenizer), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                         max_seq_len=16384, tie_embeddings=False)))
    with torch.no_grad():  # a zero row scores 0 while the best of ~300 random rows scores far above
        model.lm_head.weight[tokenizer.all_special_ids] = 0
    tmp = tmp_path_factory.mktemp("web-model")
    return export_hf(make_run_dir(tmp, model, tiny_tokenizer_dir), tmp / "model")


@pytest.fixture(scope="module")
def server(chat_model) -> Iterator[str]:
    with serving(chat_model, "--api-key", API_KEY) as url:
        yield url


def server_idle(url: str, within: float = 5) -> bool:
    """Whether GET /health reports no running request within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            if json.loads(r.read()).get("running", 0) == 0:
                return True
        time.sleep(0.1)
    return False


def reply_text(page, n: int) -> str:
    return page.locator(".msg.assistant .content").nth(n).text_content()


def send(page, text: str, max_tokens: int, temperature: float = 0) -> None:
    """Type a message and press Enter; returns once the page shows it (its reply streaming, done or failed)."""
    page.fill("#temperature", str(temperature))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#input", text)
    sent = page.locator(".msg.user").count()
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.user').length > {sent}", timeout=5000)


def test_page_is_one_offline_file_that_never_renders_model_text_as_html():
    html = PAGE.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//""", html)
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html


def test_page_is_served_without_a_key_and_shows_the_servers_errors_readably(server, tmp_path):
    with urllib.request.urlopen(server + "/", timeout=10) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/html")
        assert r.read().decode("utf-8") == PAGE.read_text(encoding="utf-8")
    with chromium_page(tmp_path / "profile") as page:
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('status').classList.contains('error')", timeout=10000)
        assert "HTTP 401" in page.text_content("#status") and "API" in page.text_content("#status")
        page.fill("#api-key", API_KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("!document.getElementById('model').textContent.includes('?')", timeout=10000)
        model_id = json.loads(urllib.request.urlopen(urllib.request.Request(
            server + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}), timeout=10).read())
        assert model_id["data"][0]["id"] in page.text_content("#model")
        assert page.text_content("#status") == "就绪 ready"

        send(page, "你好", max_tokens=100_000)  # beyond the 16k-token context: the server answers 400
        page.wait_for_selector(".msg.error", timeout=10000)
        error = page.text_content(".msg.error .content")
        assert error.startswith("HTTP 400: ") and "max_tokens" in error and "{" not in error, error
        assert page.locator(".msg.assistant").count() == 0 and page.input_value("#input") == "你好"
        page.wait_for_selector("body[data-state=ready]", timeout=5000)


def test_page_streams_a_chinese_chat_stops_a_reply_and_sends_the_history(server, tmp_path):
    bodies, aborted = [], []
    with chromium_page(tmp_path / "profile") as page:
        page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
        page.on("requestfailed", lambda r: aborted.append(r.failure) if r.url.endswith("/chat/completions") else None)
        page.goto(server + "/")
        page.fill("#api-key", API_KEY)
        page.dispatch_event("#api-key", "change")
        page.fill("#system", SYSTEM)

        # turn 1 runs to max_tokens; the usage chunk gives the exact count and the speed
        send(page, QUESTIONS[0], max_tokens=24)
        page.wait_for_selector("body[data-state=ready]", timeout=30000)
        first = reply_text(page, 0)
        assert first and page.locator(".msg.error").count() == 0
        stats = page.text_content("#stats")
        # "24 tokens", not "≈24": the count comes from the usage chunk
        assert re.search(r"(?<!≈)24 tokens · \d+\.\d tokens/s · 首字 first token \d+ ms · 结束 finish: length",
                         stats), stats

        # turn 2 would run for 15000 tokens (half a minute): text shows and grows while the request is open,
        # then stop ends it and frees the server
        send(page, QUESTIONS[1], max_tokens=15_000, temperature=0.8)
        grew = page.wait_for_function(
            """() => { const c = document.querySelectorAll('.msg.assistant .content')[1];
                       const n = c.textContent.length;
                       if (n === 0 || document.body.dataset.state !== 'streaming') return false;
                       if (window.seen === undefined) { window.seen = n; return false; }
                       return n > window.seen && document.body.dataset.state === 'streaming'; }""",
            polling=50, timeout=20000)
        assert grew and page.get_attribute("body", "data-state") == "streaming"
        assert re.search(r"tokens/s", page.text_content("#stats"))
        page.click("#stop")
        page.wait_for_selector("body[data-state=ready]", timeout=5000)
        stopped = reply_text(page, 1)
        page.wait_for_timeout(800)
        assert reply_text(page, 1) == stopped and stopped  # nothing arrives after stop
        assert aborted and "ABORTED" in aborted[0].upper()
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        assert "已停止 stopped" in page.text_content(".msg.assistant >> nth=1")
        assert "结束 finish: stopped" in page.text_content("#stats")
        assert server_idle(server), "the server still generates the stopped reply"

        # turn 3 carries the whole conversation, the stopped reply as it was shown
        send(page, QUESTIONS[2], max_tokens=8)
        page.wait_for_selector("body[data-state=ready]", timeout=30000)
        assert len(reply_text(page, 2)) > 0
        paths = save_screenshot(page, "web-chat.png", tmp_path)

    system, hello, poem, thanks = (
        {"role": "system", "content": SYSTEM}, *({"role": "user", "content": q} for q in QUESTIONS))
    answer, stopped_answer = {"role": "assistant", "content": first}, {"role": "assistant", "content": stopped}
    assert [b["messages"] for b in bodies] == [[system, hello], [system, hello, answer, poem],
                                               [system, hello, answer, poem, stopped_answer, thanks]]
    assert [(b["max_tokens"], b["temperature"], b["stream"]) for b in bodies] == [(24, 0, True), (15_000, 0.8, True),
                                                                                  (8, 0, True)]
    assert all(p.stat().st_size > 10_000 for p in paths)
