"""The suite's fixtures and collection hook; the generators and comparisons they share are in `helpers`."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from helpers import CHROMIUM, CHROMIUM_ARGS, DATA


@pytest.fixture(scope="session")
def dsb2018() -> tuple[np.ndarray, np.ndarray]:
    """The real DSB2018 nuclei image (uint16) and its hand-made labels (125 nuclei, values up to 183)."""
    return tifffile.imread(DATA / "dsb2018_image.tif"), tifffile.imread(DATA / "dsb2018_labels.tif")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, driven by Playwright: a test that takes this fixture needs the browser installed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: only the tests that will run count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stop at collection, with one line, when the selected tests need Chromium and it is not installed; put the
    tests that wait for scripts/test's background build last."""
    items.sort(key=lambda item: item.get_closest_marker("omero") is not None)
    needing = [item for item in items if "browser" in getattr(item, "fixturenames", ())]
    if not needing or config.option.collectonly or os.access(CHROMIUM, os.X_OK):
        return
    count = f"{len(needing)} selected test needs" if len(needing) == 1 else f"{len(needing)} selected tests need"
    message = (f"{CHROMIUM} is not installed and {count} it: run scripts/test, which installs Debian's chromium, "
               "or apt-get install chromium")
    # A failed collection report rather than a UsageError: pytest-xdist's workers pass it on to the controller,
    # which stops the run with this message (a UsageError in a worker is an internal error there).
    config.hook.pytest_collectreport(report=pytest.CollectReport(needing[0].nodeid, "failed", message, []))
    items[:] = []
