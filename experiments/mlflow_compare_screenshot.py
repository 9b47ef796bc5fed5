"""Screenshot of MLflow's compare view for the newest sweep in a store: a real `mlflow ui`, a real Chromium.

    python -m jointdit.train experiment=sweep_lr_guidance max_steps=60      # the demo sweep (4 jobs)
    python experiments/mlflow_compare_screenshot.py --store mlflow.db --out docs/mlflow_compare.png

Needs Debian's chromium (/usr/bin/chromium) and playwright (the test extra); Playwright never downloads
a browser here. The server listens on 127.0.0.1 only and is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def newest_sweep(uri: str, experiment: str) -> tuple[str, str, list[str]]:
    """(experiment id, parent run id, child run ids) of the newest parent run that has children."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500)
    for parent in runs:
        children = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        if children:
            return exp.experiment_id, parent.info.run_id, children
    raise SystemExit(f"no sweep (a parent run with children) in experiment {experiment!r}")


def _tidy(page) -> None:
    """Switch the sidebar to the model-training workflow and close the assistant panel, when present."""
    for action in (lambda: page.get_by_text("Model training", exact=True).first.click(timeout=5000),
                   lambda: page.locator('[aria-label*="close" i]').first.click(timeout=5000)):
        try:
            action()
            page.wait_for_timeout(1000)
        except Exception:  # noqa: BLE001 - the UI differs between MLflow versions
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="mlflow.db", help="the sqlite file")
    parser.add_argument("--experiment", default="train")
    parser.add_argument("--out", default="docs/mlflow_compare.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1100)
    args = parser.parse_args()

    uri = f"sqlite:///{Path(args.store).resolve()}"
    experiment_id, parent, children = newest_sweep(uri, args.experiment)
    port = free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen([mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("mlflow ui did not start")
                time.sleep(0.5)
        query = urllib.parse.urlencode({"runs": json.dumps(children), "experiments": json.dumps([experiment_id])})
        url = f"{base}/#/compare-runs?{query}"
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(url, wait_until="networkidle", timeout=180_000)
            # The page draws placeholders first; wait for the run table, then for the charts to draw.
            page.get_by_text("Parameters", exact=False).first.wait_for(timeout=180_000)
            _tidy(page)
            try:
                page.locator(".js-plotly-plot, svg.main-svg").first.wait_for(timeout=120_000)
            except Exception:  # noqa: BLE001 - a screenshot without the plot still shows the table
                print("the parallel-coordinates plot did not draw in time", file=sys.stderr)
            page.wait_for_timeout(5000)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"{args.out}: compare view of {len(children)} child runs of {parent} ({url})")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
