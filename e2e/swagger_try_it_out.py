"""`make e2e`: a real browser uses Swagger UI's Try it out on POST /invoice.

Headless Chromium (Debian's package, driven by Playwright for Python with no browser download)
opens /docs on the app at APP_URL, expands POST /invoice, presses Try it out and Execute with
the prefilled example, and checks that the page shows a 201 with a PENDING invoice. A
screenshot goes to artifacts/swagger-try-it-out.png. With API_KEY set (the app running with
AUTH=on) it first signs in through the Authorize button, as a person would.
"""

import os
import re
import sys
from pathlib import Path

from playwright.sync_api import FloatRect, Page, expect, sync_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parent.parent / "artifacts" / "swagger-try-it-out.png"
CREATE = "#operations-invoices-create_invoice"  # tag, then the operation id


def authorize(page: Page, api_key: str) -> None:
    page.locator("button.authorize").first.click()
    dialog = page.locator(".modal-ux")
    dialog.locator("input").first.fill(api_key)
    dialog.locator("button.modal-btn.authorize").click()  # labelled "Apply credentials"
    expect(dialog.locator("button.modal-btn.authorize")).to_have_count(0)  # now "Logout"
    dialog.locator("button.btn-done").click()


def main() -> int:
    url = os.environ["APP_URL"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(f"{url}/docs")
        if api_key := os.environ.get("API_KEY"):
            authorize(page, api_key)
        operation = page.locator(CREATE)
        operation.locator(".opblock-summary").click()
        operation.get_by_role("button", name="Try it out").click()
        operation.get_by_role("button", name="Execute").click()

        status = operation.locator(".live-responses-table .response .response-col_status").first
        expect(status).to_have_text(re.compile(r"^\s*201"), timeout=15_000)
        body = operation.locator(".live-responses-table .response-col_description pre").first
        expect(body).to_contain_text('"invoiceStatus": "PENDING"')
        expect(body).to_contain_text('"customerName": "Jane Smith"')

        SCREENSHOT.parent.mkdir(exist_ok=True)
        # From the operation's header down to the server's reply: request, curl and 201.
        top = operation.bounding_box()
        bottom = operation.locator(".live-responses-table").first.bounding_box()
        assert top is not None
        assert bottom is not None
        height = bottom["y"] + bottom["height"] - top["y"]
        clip: FloatRect = {"x": top["x"], "y": top["y"], "width": top["width"], "height": height}
        page.screenshot(path=str(SCREENSHOT), clip=clip, full_page=True)
        browser.close()
    signed_in = " after Authorize with an API key" if os.environ.get("API_KEY") else ""
    print(f"Swagger UI Try it out answered 201 PENDING{signed_in}; screenshot: {SCREENSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
