"""The chat page (edge/static/chat.html) in headless Chromium against the real stack: a
multi-turn conversation streamed token by token, Stop, and a connection dropped mid-answer that
the page resumes to exactly the uninterrupted greedy answer."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Locator, Page, WebSocket, async_playwright, expect

from edge.client import EdgeClient
from tests.conftest import REPO

pytestmark = pytest.mark.engine

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "test-artifacts" / "chat-page.png"
ANSWER_TIMEOUT_MS = 240_000  # this CPU decodes ~14 tokens/s, and the first request warms up
STATS = re.compile(r"TTFT (\d+) ms · (\d+(?:\.\d+)?) tok/s")

Q1 = "Name one planet of the solar system, in one sentence."
Q2 = "And one more planet?"
Q_STOP = "Write a long story about a lighthouse keeper and a storm."
Q_RESUME = "Explain step by step how a lighthouse lamp and its lens work."


class Frames:
    """Every websocket the page opens, with the frames it sent and received (as Chromium saw
    them, before the page's own handlers)."""

    def __init__(self, page: Page) -> None:
        self.sockets: list[dict[str, Any]] = []
        page.on("websocket", self._opened)

    def _opened(self, ws: WebSocket) -> None:
        record: dict[str, Any] = {"url": ws.url, "sent": [], "received": []}
        self.sockets.append(record)
        ws.on("framesent", lambda payload: record["sent"].append(json.loads(payload)))
        ws.on("framereceived", lambda payload: record["received"].append(json.loads(payload)))

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [f for s in self.sockets for f in s["sent"] if f.get("type") == kind]

    def received(self, client_id: str) -> list[dict[str, Any]]:
        return [f for s in self.sockets for f in s["received"] if f.get("id") == client_id]


async def ask(page: Page, question: str, max_tokens: int, priority: str = "interactive") -> Locator:
    """Type `question` and press Enter; the locator of its answer."""
    answers = page.get_by_test_id("answer")
    before = await answers.count()
    await expect(page.locator("#send")).to_be_enabled(timeout=30_000)
    await page.select_option("#priority", priority)
    await page.fill("#max-tokens", str(max_tokens))
    await page.fill("#prompt", question)
    await page.press("#prompt", "Enter")
    await expect(answers).to_have_count(before + 1)
    await expect(page.locator("#prompt")).to_have_value("")
    return answers.nth(before)


async def settled(answer: Locator) -> str:
    """Wait for the answer to end; its state (done, stopped, error)."""
    await expect(answer).not_to_have_attribute("data-state", "streaming", timeout=ANSWER_TIMEOUT_MS)
    return await answer.get_attribute("data-state") or ""


async def text_of(answer: Locator) -> str:
    return await answer.get_by_test_id("answer-text").text_content() or ""


async def stats_of(answer: Locator) -> str:
    return await answer.get_by_test_id("answer-stats").inner_text()


async def wait_for_tokens(page: Page, last_seq: int) -> None:
    await page.wait_for_function(f"() => window.grokstack.lastSeq() >= {last_seq}", timeout=ANSWER_TIMEOUT_MS)


async def test_the_chat_page_streams_stops_and_resumes_after_a_dropped_connection(vllm_stack):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the chat page test needs Debian's chromium "
                    "(`make` installs it, or `apt-get install chromium`)")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1100, "height": 1200})
        page.set_default_timeout(60_000)
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.on("console", lambda msg: page_errors.append(msg.text) if msg.type == "error" else None)
        frames = Frames(page)
        try:
            await run_scenario(vllm_stack, page, frames)
            assert not page_errors, page_errors
        except BaseException as exc:
            exc.add_note(f"stack logs: {vllm_stack.logs}; screenshot: {SCREENSHOT}; page errors: {page_errors}")
            raise
        finally:
            await page.screenshot(path=str(SCREENSHOT))
            await browser.close()


async def run_scenario(stack, page: Page, frames: Frames) -> None:
    await page.goto(stack.page_url)
    await expect(page.locator("#status")).to_have_text("connected", timeout=30_000)
    assert frames.sockets[0]["url"].startswith(stack.url)
    await page.fill("#temperature", "0")

    # --- a question, streamed and done, with the browser-side stats
    first = await ask(page, Q1, 48)
    assert await settled(first) == "done", await first.inner_text()
    answer1 = await text_of(first)
    assert answer1.strip()
    stats = STATS.search(await stats_of(first))
    assert stats and float(stats.group(2)) > 0, await stats_of(first)
    chat = frames.sent("chat")[-1]
    assert chat["messages"] == [{"role": "user", "content": Q1}]
    assert (chat["temperature"], chat["max_tokens"], chat["priority"]) == (0, 48, "interactive")
    tokens = [f for f in frames.received(chat["id"]) if f["type"] == "token"]
    assert len(tokens) > 1 and [f["seq"] for f in tokens] == list(range(len(tokens)))  # streamed

    # --- a follow-up in the same conversation: the whole history goes with it
    second = await ask(page, Q2, 48, priority="standard")
    assert await settled(second) == "done", await second.inner_text()
    answer2 = await text_of(second)
    assert answer2.strip() and STATS.search(await stats_of(second))
    chat = frames.sent("chat")[-1]
    assert chat["messages"] == [{"role": "user", "content": Q1}, {"role": "assistant", "content": answer1},
                                {"role": "user", "content": Q2}]
    assert chat["priority"] == "standard"

    # --- a long answer, stopped after some tokens: it keeps its text and stops growing
    third = await ask(page, Q_STOP, 200)
    await wait_for_tokens(page, 5)
    await page.click("#stop")
    await expect(third).to_have_attribute("data-state", "stopped")
    stopped_text = await text_of(third)
    assert stopped_text.strip()
    stop_id = frames.sent("chat")[-1]["id"]
    assert {"type": "cancel", "id": stop_id} in frames.sent("cancel")
    for _ in range(300):  # the edge confirms the cancel
        if any(f["type"] == "error" and f["code"] == "cancelled" for f in frames.received(stop_id)):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"no cancelled frame for {stop_id}: {frames.received(stop_id)[-3:]}")
    await asyncio.sleep(1.5)
    assert await text_of(third) == stopped_text
    assert await third.get_attribute("data-state") == "stopped"
    await expect(page.locator("#stop")).to_be_disabled()

    # --- the uninterrupted answer to the next question, over a plain websocket
    history = frames.sent("chat")[-1]["messages"] + [{"role": "assistant", "content": stopped_text},
                                                     {"role": "user", "content": Q_RESUME}]
    async with await EdgeClient.connect(stack.url) as client:
        reference = await asyncio.wait_for(client.complete(history, max_tokens=120, temperature=0.0), 300)
    assert reference.error is None and reference.done is not None, reference.error
    assert reference.done["usage"]["completion_tokens"] > 20, reference.text  # long enough to drop in

    # --- the same question in the page; the connection drops after a few tokens
    await page.evaluate("""() => {
        window.statusLog = [];
        new MutationObserver(() => window.statusLog.push(document.querySelector('#status').textContent))
            .observe(document.querySelector('#status'), {childList: true, characterData: true, subtree: true});
    }""")
    fourth = await ask(page, Q_RESUME, 120)
    await wait_for_tokens(page, 4)
    status, seq_at_drop, request_id = await page.evaluate("""() => {
        window.grokstack.dropConnection();
        return [document.querySelector('#status').textContent, window.grokstack.lastSeq(),
                window.grokstack.requestId()];
    }""")
    assert status == "reconnecting"
    await expect(page.locator("#status")).to_have_text("connected", timeout=30_000)
    assert await settled(fourth) == "done", await fourth.inner_text()
    assert await text_of(fourth) == reference.text, "the resumed answer differs from the uninterrupted one"
    assert "resumed" in await stats_of(fourth) and STATS.search(await stats_of(fourth))

    chat = frames.sent("chat")[-1]
    assert chat["messages"] == history  # the stopped answer is part of the conversation
    assert len(frames.sockets) == 2
    resume = frames.sockets[1]["sent"][0]
    token = next(f["resume_token"] for f in frames.sockets[0]["received"]
                 if f.get("type") == "accepted" and f.get("id") == chat["id"])  # only the asker was told it
    assert resume == {"type": "resume", "id": chat["id"], "request_id": request_id, "last_seq": seq_at_drop,
                      "resume_token": token}
    after = [f for f in frames.sockets[1]["received"] if f.get("id") == chat["id"]]
    assert after[0] == {"type": "accepted", "id": chat["id"], "request_id": request_id, "resumed": True,
                        "region": stack.settings.bus.region, "route": "home", "resume_token": token}
    seqs = [f["seq"] for f in after if f["type"] == "token"]
    assert seqs == list(range(seq_at_drop + 1, seq_at_drop + 1 + len(seqs))), "a token repeated or missing"
    assert after[-1]["type"] == "done"
    status_log = await page.evaluate("window.statusLog")
    assert status_log[0] == "reconnecting" and status_log[-1] == "connected", status_log
