"""report.html in a real headless browser (Debian's `chromium`): "Findings" is the first section,
every image decodes, nothing scrolls sideways in a 1280-px window, and a screenshot is not blank.
Skipped when chromium is not installed; run on demand with
`pytest -m browser tests/test_reports_browser.py`."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from matplotlib import image as mpimg

from reports.render import render_report
from tests.reports_fixture import make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
]

# appended to a copy of the report: after load, record how many <img> failed to decode
# and the first section's title, whether the page is wider than the window, and how many table
# wrappers scroll sideways inside it
PROBE = (
    "<script>window.addEventListener('load',()=>{const im=[...document.images],b=document.body;"
    "b.setAttribute('data-images',im.length);"
    "b.setAttribute('data-broken',im.filter(i=>!(i.complete&&i.naturalWidth>0)).length);"
    "b.setAttribute('data-first-h2',document.querySelector('h2').textContent);"
    "b.setAttribute('data-page-overflow',document.documentElement.scrollWidth-window.innerWidth);"
    "b.setAttribute('data-wide-tables',[...document.querySelectorAll('.wrap')]"
    ".filter(w=>w.scrollWidth>w.clientWidth+1).length);});</script>"
)


def chromium(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_html_report_opens_with_every_image(tmp_path):
    d = make_run(tmp_path / "runs")
    render_report(d, ["html"])
    # offline and alone: copy the HTML away from the run folder (no plots/ next to it)
    lone = tmp_path / "alone" / "report.html"
    lone.parent.mkdir()
    lone.write_text((d / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    n_png = len(list((d / "plots").glob("*.png")))

    r = chromium("--virtual-time-budget=10000", "--window-size=1280,900", "--dump-dom", lone.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    body = re.search(r"<body[^>]*>", r.stdout).group(0)
    assert f'data-images="{n_png}"' in body, body
    assert 'data-broken="0"' in body, body
    assert 'data-first-h2="Findings"' in body, body
    overflow = int(re.search(r'data-page-overflow="(-?\d+)"', body).group(1))
    assert overflow <= 0, body  # no horizontal scrollbar
    assert 'data-wide-tables="0"' in body, body

    shot = tmp_path / "screenshot.png"
    r = chromium(
        f"--screenshot={shot}",
        "--window-size=1400,2400",
        "--virtual-time-budget=10000",
        (d / "report.html").as_uri(),
        cwd=tmp_path,
    )
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2400, 1400)
    assert img.std() > 0.05
