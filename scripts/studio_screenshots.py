"""Screenshots of Studio on real runs for the README: start `tunelab ui` yourself over a runs folder holding
finished minilm-full, minilm-lora and smollm2-sft-lora runs, then

    .venv/bin/python scripts/studio_screenshots.py http://127.0.0.1:7860 docs/studio/real

(needs Playwright's Python package and Debian's chromium, as the browser tests do)."""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

SYMPTOMS = "I have a skin rash with itchy red spots and blisters on my arms"


def main(url: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 860}, bypass_csp=True)
        page.set_default_timeout(120_000)
        page.goto(f"{url}/")
        page.wait_for_selector("#runs tbody tr")
        page.screenshot(path=str(folder / "runs.png"))
        page.goto(f"{url}/run?name=minilm-full")
        page.wait_for_selector("iframe.report")
        page.locator("#report").scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(folder / "run_report.png"))
        page.goto(f"{url}/compare?runs=minilm-full,minilm-lora")
        page.wait_for_selector("#recipe-diff")
        page.screenshot(path=str(folder / "compare.png"), full_page=True)
        page.goto(f"{url}/playground?run=minilm-full")
        page.fill("#text", SYMPTOMS)
        page.click("#predict")
        page.wait_for_selector("#labels td")
        page.screenshot(path=str(folder / "playground_classifier.png"))
        page.goto(f"{url}/playground?run=smollm2-sft-lora")
        page.fill("#prompt", SYMPTOMS)
        page.fill("#tokens", "40")
        page.click("#send")
        page.wait_for_function("['base', 'tuned'].every(w => document.getElementById('answer-' + w).dataset.done)")
        page.screenshot(path=str(folder / "playground_chat.png"))
        page.goto(f"{url}/new?from=example:symptom_to_diagnosis_lora")
        page.wait_for_function("document.querySelector('#f-model-name')?.value")
        page.fill("#f-method-r", "0")
        page.click("#validate")
        page.wait_for_function("document.querySelector('#error-f-method-r').textContent")
        page.screenshot(path=str(folder / "new_run_error.png"))
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
