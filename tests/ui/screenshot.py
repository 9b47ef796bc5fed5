"""Write the README's UI screenshot: the real app after an i2sv run, taken in Debian's Chromium.

    python tests/ui/screenshot.py <project root> <model folder> docs/ui_i2sv.png [steps]

Starts ``jointdit.ui`` in-process on a free loopback port (``paths.root_dir=<project root>``, so the
picker lists that root's runs), picks the first held-out clip's first frame in the image → sounding
video tab, generates, waits for the result and saves a full-page PNG. Not collected by pytest.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from uihelpers import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402


def main(root: str, model: str, out: str, steps: int = 30) -> Path:
    import jointdit  # noqa: F401  (torchvision fix)
    from playwright.sync_api import sync_playwright

    from jointdit.config import compose
    from jointdit.ui.app import launch

    out_dir = tempfile.mkdtemp(prefix="ui_screenshot_")
    cfg = compose("ui", [f"paths.root_dir={root}", f"checkpoint={model}", f"port={free_port()}", "block=false",
                         f"steps={steps}", f"out_dir={out_dir}"])
    _, demo, url = launch(cfg)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.get_by_role("tab", name="image → sounding video").click()
            page.locator("#i2sv-reference input").click()
            page.locator("#i2sv-reference [data-testid=dropdown-option]").first.click()
            page.locator("#i2sv-preview img").wait_for()
            page.locator("#generate-i2sv").click()
            page.get_by_text("Done: 1 sample(s)").wait_for()
            page.locator("#video-i2sv video").wait_for()
            page.locator("#preview-i2sv img").first.wait_for()
            page.wait_for_timeout(1500)
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=out, full_page=True)
            browser.close()
    finally:
        demo.close()
    return Path(out)


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:5])))
