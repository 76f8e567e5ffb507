"""`dvc plots show` works offline: its page carries the Vega scripts, and every plot draws.

DVC's own page loads vega, vega-lite and vega-embed from a CDN; `.dvc/config` points
`plots.html_template` at pipeline/plots_page.html, which inlines them (pipeline/plots_page.py
builds it from the pinned PyPI package django-js-lib-vega-embed).

The browser test looks at the page as a user does: the demo's plot stages run in a throwaway
copy, `dvc plots show` writes the page, and a headless Chromium (Debian's
chromium-headless-shell, which .ci/run installs) opens it with the network cut off (a dead
proxy and a resolver that resolves nothing). A probe script, put first in a copy of the
page, records every uncaught error, rejected promise, console.error and console.warn, every
`vegaEmbed` call and how it settled, what each plot drew (the Vega scene's data marks and
the inked pixels of its canvas), whether each image loaded, and every resource the page
fetched; Chromium's --dump-dom hands that record back. Without a Chromium that test skips
and says why; the checks of the template itself always run.

Cost: the demo built once for the session (tests/conftest.py, shared with
tests/test_dvc_pipeline.py); the browser check itself takes about a second.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline import plots_page
from tests.dvc_project import REPO, dvc

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")

# Put first in <head>: records what the page does, then writes a base64 JSON report into
# <pre id="__plots_report"> once every vegaEmbed call has settled (or after 20 s).
PROBE = r"""<script>
(function () {
  var errors = [], warnings = [], calls = [], real;
  function text(args) {
    return Array.prototype.map.call(args, function (x) { return x && x.stack ? String(x.stack) : String(x); }).join(' ');
  }
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) errors.push('failed to load ' + (t.src || t.href));
    else errors.push('uncaught: ' + e.message + ' (' + e.filename + ':' + e.lineno + ')');
  }, true);
  window.addEventListener('unhandledrejection', function (e) { errors.push('unhandled rejection: ' + text([e.reason])); });
  var ce = console.error, cw = console.warn;
  console.error = function () { errors.push('console.error: ' + text(arguments)); return ce.apply(console, arguments); };
  console.warn = function () { warnings.push('console.warn: ' + text(arguments)); return cw.apply(console, arguments); };
  function wrapped(el, spec, opts) {
    var call = {el: el, state: 'pending'};
    calls.push(call);
    var p = real(el, spec, opts);
    p.then(function (r) { call.state = 'resolved'; call.view = r.view; },
           function (err) { call.state = 'rejected'; call.error = text([err]); });
    return p;
  }
  // vega-embed's UMD build assigns window.vegaEmbed: keep it and hand out a recording wrapper
  Object.defineProperty(window, 'vegaEmbed', {
    configurable: true,
    get: function () { return real ? wrapped : undefined; },
    set: function (v) { real = v; }
  });
  function dataMarks(mark) {
    var n = 0;
    (mark.items || []).forEach(function (item) {
      if (mark.role === 'mark' && mark.marktype !== 'group') n++;
      (item.items || []).forEach(function (m) { n += dataMarks(m); });
    });
    return n;
  }
  function drawn(el) {
    var c = el && el.querySelector('canvas'), s = el && el.querySelector('svg');
    if (c) {
      var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, n = 0;
      for (var i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250)) n++;
      return {kind: 'canvas', width: c.width, height: c.height, inked: n};
    }
    if (s) {
      var b = s.getBoundingClientRect();
      return {kind: 'svg', width: b.width, height: b.height, inked: s.querySelectorAll('path, rect, line, text').length};
    }
    return {kind: 'none', width: 0, height: 0, inked: 0};
  }
  function report() {
    var out = {
      errors: errors, warnings: warnings,
      plots: calls.map(function (c) {
        var el = typeof c.el === 'string' ? document.querySelector(c.el) : c.el, r = drawn(el);
        r.id = el ? el.id : String(c.el);
        r.state = c.state; r.error = c.error || null;
        r.marks = c.view ? dataMarks(c.view.scenegraph().root) : 0;
        return r;
      }),
      images: Array.prototype.map.call(document.images, function (i) {
        return {src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight};
      }),
      resources: performance.getEntriesByType('resource').map(function (e) { return e.name; }),
      versions: {'vega': window.vega && window.vega.version, 'vega-lite': window.vegaLite && window.vegaLite.version,
                 'vega-embed': real && real.version}
    };
    var pre = document.createElement('pre');
    pre.id = '__plots_report';
    pre.textContent = btoa(unescape(encodeURIComponent(JSON.stringify(out))));
    document.body.appendChild(pre);
  }
  window.addEventListener('load', function () {
    var t0 = Date.now();
    (function wait() {
      var settled = calls.every(function (c) { return c.state !== 'pending'; });
      if (settled || Date.now() - t0 > 20000) setTimeout(report, 500); else setTimeout(wait, 100);
    })();
  });
})();
</script>
"""


def browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def offline_flags(profile: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={profile}"]


def render_report(page: Path, work: Path) -> tuple[dict, str]:
    """Open a probed copy of ``page`` offline; the probe's report and Chromium's console lines."""
    html = page.read_text(encoding="utf-8")
    assert "<head>" in html
    probed = page.with_name("probed.html")  # beside the page: its images are relative links
    probed.write_text(html.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    p = subprocess.run([browser(), *offline_flags(work / "profile"), "--virtual-time-budget=60000",
                        "--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri()],
                       capture_output=True, text=True, timeout=240)
    console = "\n".join(line for line in p.stderr.splitlines() if ":CONSOLE" in line)
    m = re.search(r'<pre id="__plots_report">([A-Za-z0-9+/=]*)</pre>', p.stdout)
    assert m, f"no report from the page (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return json.loads(base64.b64decode(m.group(1)).decode("utf-8")), console


def screenshot(page: Path, png: Path, work: Path, width: int = 1100, height: int = 2400) -> None:
    """A screenshot of ``page`` as Chromium draws it offline (README's picture came from this)."""
    subprocess.run([browser(), *offline_flags(work / "profile-shot"), "--hide-scrollbars",
                    f"--window-size={width},{height}", "--virtual-time-budget=60000",
                    f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=240)


class _Refs(HTMLParser):
    """Every URL the page's markup loads (src, href, data, poster, srcset), inline scripts aside."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "data", "poster", "srcset", "action") and value:
                self.refs.append((tag, name, value))


def remote_refs(html: str) -> list[tuple[str, str, str]]:
    parser = _Refs()
    parser.feed(html)
    return [r for r in parser.refs if re.match(r"\s*(https?:)?//", r[2], flags=re.I)]


# ---- the template ----------------------------------------------------------------------

def test_committed_template_is_what_the_pinned_package_gives():
    assert plots_page.TEMPLATE.read_text(encoding="utf-8") == plots_page.build(), \
        "pipeline/plots_page.html is stale: run `python -m pipeline.plots_page`"


def test_template_loads_nothing_from_the_network_and_drops_dvcs_cdn_scripts():
    html = plots_page.TEMPLATE.read_text(encoding="utf-8")
    assert html.count("{plot_divs}") == 1
    assert "{scripts}" not in html  # DVC would put its CDN <script src=...> tags there
    assert remote_refs(html) == []
    for lib, _, _ in plots_page.LIBRARIES:
        assert f'<script data-library="{lib}" data-version="' in html


def test_dvc_config_uses_the_template():
    p = subprocess.run([sys.executable, "-m", "dvc", "config", "plots.html_template"], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (REPO / ".dvc" / p.stdout.strip()).resolve() == plots_page.TEMPLATE


def test_check_mode_reports_a_stale_template(tmp_path, monkeypatch, capsys):
    assert plots_page.main(["--check"]) == 0
    stale = tmp_path / "plots_page.html"
    stale.write_text(plots_page.build().replace("<title>DVC Plot</title>", "<title>old</title>"))
    monkeypatch.setattr(plots_page, "TEMPLATE", stale)
    assert plots_page.main(["--check"]) == 1
    assert "python -m pipeline.plots_page" in capsys.readouterr().err


# ---- the page, as a user sees it ---------------------------------------------------------

@pytest.fixture(scope="module")
def shown(demo_project):
    """The demo built in a copy (tests/conftest.py, shared), then `dvc plots show` (no options:
    .dvc/config)."""
    proj, _ = demo_project
    out = dvc(proj, "plots", "show")
    page = proj / "dvc_plots" / "index.html"
    assert page.is_file(), out
    defs = json.loads(dvc(proj, "plots", "show", "--json"))
    return proj, page, defs


def _expected(defs: dict) -> tuple[int, int]:
    """(Vega plots, images) that DVC rendered, from `dvc plots show --json`."""
    kinds = [r["type"] for renderers in defs["data"].values() for r in renderers]
    return kinds.count("vega"), kinds.count("image")


def test_plots_page_has_no_remote_reference(shown):
    _, page, defs = shown
    html = page.read_text(encoding="utf-8")
    assert remote_refs(html) == []
    assert "cdn.jsdelivr" not in html
    n_vega, n_images = _expected(defs)
    assert n_vega >= 3 and n_images >= 1, list(defs["data"])
    assert len(re.findall(r"vegaEmbed\('#", html)) == n_vega


def test_every_plot_draws_offline(shown, tmp_path):
    if browser() is None:
        pytest.skip("no headless Chromium (looked for " + ", ".join(BROWSERS) + "); .ci/run installs "
                    "Debian's chromium-headless-shell: `apt-get install chromium-headless-shell`")
    _, page, defs = shown
    report, console = render_report(page, tmp_path)
    context = f"\nreport: {json.dumps(report, indent=1)[:6000]}\nconsole:\n{console[-3000:]}"
    assert report["errors"] == [], context
    assert [r for r in report["resources"] if not r.startswith(("file:", "data:", "blob:"))] == [], context
    n_vega, n_images = _expected(defs)
    assert len(report["plots"]) == n_vega, context
    for plot in report["plots"]:
        assert plot["state"] == "resolved", (plot, context)
        assert plot["kind"] in ("canvas", "svg") and plot["width"] > 0 and plot["height"] > 0, (plot, context)
        assert plot["marks"] > 0, (f"{plot['id']}: no data marks in the Vega scene", context)
        assert plot["inked"] > 100, (f"{plot['id']}: nothing drawn", context)
    assert len(report["images"]) == n_images, context
    for img in report["images"]:
        assert img["complete"] and img["width"] > 0, (img, context)
    # the page runs the libraries the template's header names
    html = plots_page.TEMPLATE.read_text(encoding="utf-8")
    for lib, version in report["versions"].items():
        assert f'data-library="{lib}" data-version="{version}"' in html, report["versions"]
