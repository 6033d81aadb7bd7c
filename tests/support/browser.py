"""The Prefect UI in a real browser, as an operator uses it: Debian's headless Chromium
(`/usr/bin/chromium`) driven by Playwright for Python. :func:`approve_in_ui` opens a paused
run, reads what the approver is shown (the state message, the form's text and fields, and
whether any of it is clipped), answers the form, and leaves screenshots under
:data:`SCREENSHOTS`.

Prefect 3.8 serves two UIs: a run's own address (``/runs/flow-run/ID``, the link Prefect
prints) opens the v1 UI, the home page the v2 UI (under ``/v2``); both are driven here.
Where Chromium or Playwright is missing the test is skipped, saying which."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.helpers import REPO, wait_until

CHROMIUM = os.environ.get("DBMIGRATE_CHROMIUM", "/usr/bin/chromium")
# No sandbox (containers, root), and nothing that would reach the internet.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
# Where the screenshots go (git-ignored); DBMIGRATE_SCREENSHOTS moves them.
SCREENSHOTS = Path(os.environ.get("DBMIGRATE_SCREENSHOTS", REPO / "screenshots"))
VIEWPORT = {"width": 1400, "height": 1000}
WAIT_MS = 30_000  # for a page of the UI to show what it loads


def require_browser() -> None:
    """Skip the test, saying why, where Playwright or Chromium is missing (call it before
    starting servers the test would need them for)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Playwright for Python is not installed ({exc}): pip install playwright")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set DBMIGRATE_CHROMIUM)")


@contextmanager
def browser_page(ui_url: str = "", auth: str | None = None) -> Iterator:
    """A fresh page of headless Chromium; the test is skipped, saying why, without one. With
    ``auth``, logged in to the UI at ``ui_url`` first, through its login page, as a user does."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(WAIT_MS)
            if auth is not None:
                page.goto(f"{ui_url.rstrip('/')}/login")
                page.locator("input[type=password]").fill(auth)
                page.get_by_role("button", name="Login").click()
                page.wait_for_url(lambda url: "/login" not in url)
            yield page
        finally:
            browser.close()


@dataclass
class SeenForm:
    """What the approver saw before answering."""

    state_message: str  # the paused run's state message, as its Details tab shows it
    text: str  # the form's description, as rendered
    fields: list[str]  # the fields' labels, as shown: "Comment (Optional)" for an optional one
    clipped: list[str]  # the start of each block of the description that does not fit its width
    screenshots: list[Path]


# For each element of the description that may clip (a code block, a table): does it scroll sideways?
_CLIPPED = """(root) => [...root.querySelectorAll('pre, table')].flatMap(el => {
    const boxes = [el, el.parentElement];
    return boxes.some(b => b.scrollWidth > b.clientWidth + 1) ? [el.innerText.slice(0, 60)] : [];
})"""

# A code block's text comes after the rest of the form (the UI highlights it once its language is
# loaded): under load, read at once, the form's SQL was once empty.
_CODE_SHOWN = """(root) => [...root.querySelectorAll('pre, .p-code-highlight')].every(el => el.textContent.trim() !== '')"""


def approve_in_ui(ui_url: str, flow_run_id: str, approver: str, comment: str = "", *, decision: str = "approve",
                  ui: str = "v1", screenshots: Path = SCREENSHOTS, name: str = "approval",
                  auth: str | None = None) -> SeenForm:
    """Answer the approval form of the paused run ``flow_run_id`` in the ``ui`` ("v1" or "v2")
    of the Prefect server at ``ui_url``: ``decision`` ("approve" or "reject"), the approver's
    name, a comment; ``auth``: the server's auth string, typed into the login page. Screenshots ``<name>-<ui>-*.png`` go to ``screenshots``: the run's
    details, the form as it opened, filled in, and the run page after it was sent."""
    screenshots.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []

    def shot(page, what: str) -> None:
        shots.append(screenshots / f"{name}-{ui}-{what}.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    driver = _V1 if ui == "v1" else _V2
    with browser_page(ui_url, auth) as page:
        page.goto(f"{ui_url.rstrip('/')}{driver.prefix}/runs/flow-run/{flow_run_id}")
        state_message = driver.state_message(page)
        shot(page, "1-paused")
        dialog = driver.open_form(page)
        description = driver.description(dialog)
        wait_until(lambda: description.evaluate(_CODE_SHOWN), 30, "the form's code blocks shown", 0.2)
        seen = SeenForm(state_message, description.inner_text(), dialog.locator("label").all_inner_texts(),
                        description.evaluate(_CLIPPED), shots)
        shot(page, "2-form")
        driver.choose(page, dialog, decision)
        driver.text_field(page, dialog, "Approver").fill(approver)
        if comment:
            driver.text_field(page, dialog, "Comment").fill(comment)
        shot(page, "3-filled")
        driver.submit(dialog)
        try:
            dialog.wait_for(state="hidden", timeout=20_000)
        except PlaywrightTimeout:  # under load Prefect's SQLite may answer "database is locked": an operator sends it again
            shot(page, "3-not-sent")
            driver.submit(dialog)
            dialog.wait_for(state="hidden")
        shot(page, "4-sent")
    return seen


@dataclass
class SeenArtifact:
    """A markdown artifact as the UI renders it."""

    text: str
    links: dict[str, str]  # each link's text -> its address
    clipped: list[str]
    screenshot: Path


def show_artifact(ui_url: str, flow_run_id: str, key: str, *, screenshots: Path = SCREENSHOTS,
                  name: str = "artifact", auth: str | None = None) -> SeenArtifact:
    """Open the run's artifact ``key`` from its Artifacts tab (v1 UI, a run's own address), as a
    reader of the run history does; a screenshot ``<name>.png`` goes to ``screenshots``."""
    screenshots.mkdir(parents=True, exist_ok=True)
    with browser_page(ui_url, auth) as page:
        page.goto(f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}")
        page.get_by_text("Artifacts", exact=True).click()
        page.locator("a[href*='/artifacts/artifact/']").filter(has=page.get_by_text(key, exact=True)).click()
        rendered = page.locator(".artifact-data-markdown")
        rendered.wait_for()
        links = {a.inner_text(): a.get_attribute("href") for a in rendered.locator("a").all()}
        seen = SeenArtifact(rendered.inner_text(), links, rendered.evaluate(_CLIPPED), screenshots / f"{name}.png")
        page.screenshot(path=str(seen.screenshot), full_page=True)
    return seen


class _V1:
    """The Vue UI (a run's own address)."""

    prefix = ""

    @staticmethod
    def state_message(page) -> str:
        page.get_by_role("button", name="Resume").wait_for()
        page.get_by_text("Details", exact=True).click()
        message = page.locator(".p-key-value", has_text="State Message").locator(".p-key-value__value")
        toggle = message.locator(".p-text-truncate--action-text")  # a long message is cut, with "See More"
        if toggle.count():
            toggle.click()
            return message.inner_text().removesuffix(toggle.inner_text()).strip()
        return message.inner_text().strip()

    @staticmethod
    def open_form(page):
        page.get_by_role("button", name="Resume").click()
        dialog = page.locator(".p-modal__card")
        dialog.locator(".schema-form-property").first.wait_for()
        return dialog

    @staticmethod
    def description(dialog):
        return dialog.locator(".p-modal__body > .markdown-renderer")

    @staticmethod
    def text_field(page, dialog, label: str):
        name = page.locator(".schema-form-property__label", has_text=label)
        return dialog.locator(".schema-form-property").filter(has=name).locator("textarea")

    @staticmethod
    def choose(page, dialog, decision: str) -> None:
        dialog.locator(".p-select-button__control").focus()
        page.keyboard.press("ArrowDown")  # opens the list (a click does not, in headless Chromium)
        page.locator(".p-select-option", has_text=decision).click()

    @staticmethod
    def submit(dialog) -> None:
        dialog.get_by_role("button", name="Submit").click()


class _V2:
    """The React UI (the home page's default)."""

    prefix = "/v2"

    @staticmethod
    def state_message(page) -> str:
        page.get_by_role("tab", name="Details").click()
        label = page.get_by_text("State Message", exact=True)
        return label.locator("xpath=following-sibling::*[1]").inner_text().strip()

    @staticmethod
    def open_form(page):
        page.get_by_role("button", name="Open menu").first.click()
        page.get_by_role("menuitem", name="Resume").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Decision", exact=True).wait_for()
        return dialog

    @staticmethod
    def description(dialog):
        return dialog.locator(".prose, [class*=markdown]").first

    @staticmethod
    def text_field(page, dialog, label: str):
        return dialog.get_by_label(label)

    @staticmethod
    def choose(page, dialog, decision: str) -> None:
        dialog.get_by_role("button", name="Select Decision").click()
        page.get_by_role("option", name=decision, exact=True).click()

    @staticmethod
    def submit(dialog) -> None:
        dialog.get_by_role("button", name="Resume").click()
