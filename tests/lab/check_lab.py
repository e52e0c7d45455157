"""Open notebooks in a real JupyterLab in headless Chromium and check they open clean.

``make check-lab`` runs this (``python tests/lab/check_lab.py [--only 01 03 08]``). It is not a
pytest module (``tests/lab/conftest.py`` keeps pytest from importing it): it needs a browser,
a driver and a few seconds per notebook, so it runs on its own.

What it does, all in a fresh temporary folder that it removes at the end:

1. Copies ``notebooks/`` and ``figures/`` there (markdown cells link ``../figures``), so nothing
   in the checkout can be changed, and JupyterLab gets its own settings, workspaces, runtime and
   data folders (the user's JupyterLab settings cannot change the outcome).
2. Trusts the copies in that data folder, as ``jupyter trust`` does (``make trust`` and
   ``make lab`` do it for the checkout): JupyterLab draws stored widget views only in trusted
   notebooks and shows their text repr otherwise.
3. Starts ``jupyter lab`` on 127.0.0.1 (a free port, a random token, no browser) and opens
   each notebook in headless Chromium through the system ``chromedriver``.
4. Once the notebook's kernel is idle, checks what a user sees: no dialog; the tab not marked
   unsaved (the kernel writes ``kernelspec`` and ``language_info`` into the notebook on open, so
   stored values that differ mark it dirty; the message names the metadata that changed);
   LaTeX typeset with no MathJax error (``mjx-merror``) and typeset at all where the markdown
   has ``$``; every stored image output drawn (an ``img`` with pixels); every stored widget view
   rendered as ``.jupyter-widgets`` (not as a text repr or a "model not found" error).
5. Always shuts the server down (its kernels first), even on failure or Ctrl-C.

Exit status 0 when every check passes, 1 with one line per failure otherwise, 2 when a
prerequisite (browser, driver, selenium) is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NOTEBOOKS = ("01", "03", "08")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# JupyterLab settings of the throwaway settings folder: no news/update toasts over the page.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
}

# The notebook panel in front, as the page's JupyterLab sees it (needs expose_app_in_browser).
PANEL_STATE_JS = """
const app = window.jupyterapp;
const w = app && app.shell.currentWidget;
if (!w || !w.context || !w.sessionContext) { return null; }
const model = w.context.model;
return {
  path: w.context.path,
  ready: w.context.isReady && !!model,
  dirty: model ? model.dirty : null,
  status: w.sessionContext.kernelDisplayStatus,
  kernel: w.sessionContext.kernelDisplayName,
  metadata: model ? model.sharedModel.getMetadata() : null,
};
"""

# What the notebook shows (DOM only: what a user would see).
DOM_STATE_JS = r"""
const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
const count = (sel, root) => (root || document).querySelectorAll(sel).length;
const texts = (sel) => Array.from(document.querySelectorAll(sel)).map(e => e.textContent.trim());
if (!nb) { return null; }
const outImgs = Array.from(nb.querySelectorAll('.jp-OutputArea-output img'))
  .filter(i => !i.closest('.jupyter-widgets'));  // an Image widget is not a stored image output
const mdImgs = Array.from(nb.querySelectorAll('.jp-RenderedMarkdown img'));
// arguments[0]: indices of the cells whose stored outputs hold a widget view.
const cells = nb.querySelectorAll('.jp-Cell');
const widgetCells = arguments[0].map(i => cells[i]).filter(c => c);
const widgetText = c => Array.from(c.querySelectorAll('.jp-OutputArea-output'))
  .map(o => o.textContent.trim()).join(' ').slice(0, 120);  // innerText is empty off screen
// Markdown text still holding a $ outside code and typeset math: TeX left as it was typed.
const rawTex = Array.from(nb.querySelectorAll('.jp-RenderedMarkdown')).map(md => {
  const c = md.cloneNode(true);
  c.querySelectorAll('code, pre, mjx-container, script').forEach(e => e.remove());
  const t = c.textContent;
  const i = t.indexOf('$');
  return i < 0 ? null : t.slice(Math.max(0, i - 30), i + 50).replace(/\s+/g, ' ');
}).filter(t => t !== null);
return {
  dialogs: texts('.jp-Dialog'),
  rawTex: rawTex,
  dirtyTabs: texts('.lm-TabBar-tab.jp-mod-dirty'),
  mathjax: count('mjx-container', nb),
  mathErrors: texts('mjx-merror'),
  outputImages: outImgs.length,
  outputImagesDrawn: outImgs.filter(i => i.complete && i.naturalWidth > 0).length,
  markdownImages: mdImgs.length,
  markdownImagesDrawn: mdImgs.filter(i => i.complete && i.naturalWidth > 0).length,
  widgetOutputs: widgetCells.filter(c => c.querySelector('.jp-OutputArea-output .jupyter-widgets'))
    .length,
  widgetShownInstead: widgetCells
    .filter(c => !c.querySelector('.jp-OutputArea-output .jupyter-widgets')).map(widgetText),
  widgetErrors: widgetCells.map(widgetText)
    .filter(t => t.includes('Error displaying widget')),
  widgetElements: count('.jupyter-widgets', nb),
};
"""


class Prerequisite(RuntimeError):
    """Something to install first (browser, driver, selenium)."""


def find_browser() -> tuple[str, str]:
    """``(browser, chromedriver)`` paths: ``$CHROME_BIN`` / ``$CHROMEDRIVER`` or the first found
    on ``PATH`` (``$CHROMEWEBDRIVER``, set on GitHub's runners, is a folder holding the driver)."""
    browser = os.environ.get("CHROME_BIN") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if driver is None and os.environ.get("CHROMEWEBDRIVER"):
        driver = shutil.which("chromedriver", path=os.environ["CHROMEWEBDRIVER"])
    missing = [n for n, p in (("Chromium", browser), ("chromedriver", driver)) if not p]
    if missing:
        raise Prerequisite(
            f"{' and '.join(missing)} not found: install them with `apt-get install chromium "
            "chromium-driver` (Debian; `make check-lab` does) or point $CHROME_BIN / "
            "$CHROMEDRIVER at a Chrome or Chromium and its matching driver")
    return browser, driver


def pick_notebooks(only: list[str]) -> list[Path]:
    """``notebooks/NN_*.ipynb`` by number (``08``) or stem (``08_ablations``), in the given
    order. (Not :func:`pfl.viz.figures.numbered_notebooks`: importing pfl imports torch, which
    takes longer than opening a notebook.)"""
    found = sorted((ROOT / "notebooks").glob("[0-9]*_*.ipynb"))
    paths = []
    for o in only:
        hits = [p for p in found if p.stem == o or p.stem.split("_", 1)[0] == o]
        if not hits:
            raise ValueError(f"no notebook matches {o!r}; there are {[p.stem for p in found]}")
        paths += hits
    return paths


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected(path: Path) -> dict:
    """What the stored notebook should show: image outputs, widget views, markdown math."""
    nb = json.loads(path.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    data = [o.get("data", {}) for o in outputs]
    widget_cells = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
                    and any(WIDGET_VIEW in o.get("data", {}) for o in c.get("outputs", []))]
    markdown = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    return {"images": sum(any(k.startswith("image/") for k in d) for d in data),
            "widgets": sum(WIDGET_VIEW in d for d in data), "widget_cells": widget_cells,
            "math": any("$" in m for m in markdown),
            "markdown_images": sum(m.count("![") for m in markdown),
            "metadata": nb["metadata"]}


def lab_workspace(tmp: Path, trust: list[Path]) -> dict[str, str]:
    """Copy the notebooks (and figures) under ``tmp``, trust the copies of ``trust`` there,
    and return the environment of a JupyterLab that uses only ``tmp`` for its settings and
    state."""
    import nbformat
    from nbformat.sign import NotebookNotary

    shutil.copytree(ROOT / "notebooks", tmp / "root" / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    if (ROOT / "figures").is_dir():
        shutil.copytree(ROOT / "figures", tmp / "root" / "figures")
    dirs = {"JUPYTER_CONFIG_DIR": "config", "JUPYTER_DATA_DIR": "data",
            "JUPYTER_RUNTIME_DIR": "runtime", "JUPYTERLAB_SETTINGS_DIR": "settings",
            "JUPYTERLAB_WORKSPACES_DIR": "workspaces", "IPYTHONDIR": "ipython"}
    env = dict(os.environ)
    for var, name in dirs.items():
        (tmp / name).mkdir()
        env[var] = str(tmp / name)
    for rel, value in LAB_SETTINGS.items():
        f = tmp / "settings" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    notary = NotebookNotary(data_dir=str(tmp / "data"))  # what `jupyter trust` does
    for p in trust:
        copy = tmp / "root" / "notebooks" / p.name
        notary.sign(nbformat.read(copy, as_version=4))
    return env


def start_lab(root: Path, env: dict[str, str], log: Path, timeout: float
              ) -> tuple[subprocess.Popen, str, str]:
    """Start ``jupyter lab`` on a free 127.0.0.1 port with a random token; wait until it
    answers. Returns ``(process, base_url, token)``."""
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:  # containers and CI runners often run as root
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with status {proc.returncode}:\n"
                               + tail(log))
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                return proc, base, token
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    stop_lab(proc, base, token)
    raise RuntimeError(f"jupyter lab did not answer within {timeout:.0f} s:\n" + tail(log))


def stop_lab(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut the server down with its kernels (``/api/shutdown``), then make sure it is gone."""
    if proc.poll() is None:
        try:
            req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=10).close()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def close_sessions(base: str, token: str) -> None:
    """Shut down every kernel the server runs (one per opened notebook), so the next
    notebook does not share the CPU with idle kernels."""
    auth = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/api/sessions", headers=auth),
                                timeout=10) as r:
        sessions = json.load(r)
    for sess in sessions:
        req = urllib.request.Request(f"{base}/api/sessions/{sess['id']}", method="DELETE",
                                     headers=auth)
        urllib.request.urlopen(req, timeout=30).close()


def tail(path: Path, n: int = 30) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def make_driver(browser: str, chromedriver: str, window: tuple[int, int]):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        raise Prerequisite("selenium is not installed: `pip install -e '.[dev]'` (make check-lab "
                           "does)") from err
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={window[0]},{window[1]}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)


def wait_for(fn, timeout: float, what: str, poll: float = 0.25):
    """Call ``fn`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    t0 = time.monotonic()
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def settled(probe, done, quiet: float, timeout: float) -> dict:
    """Call ``probe()`` until ``done(probe)`` holds and the probe has not changed for
    ``quiet`` seconds (MathJax typesets, images decode and widgets render after the kernel is
    idle, and a late metadata change would mark the tab later); at ``timeout``, return the
    last probe as it is."""
    t0 = time.monotonic()
    last, since = None, time.monotonic()
    while True:
        state = probe()
        sig = json.dumps(state, sort_keys=True)
        if sig != last:
            last, since = sig, time.monotonic()
        elif state is not None and done(state) and time.monotonic() - since >= quiet:
            return state
        if time.monotonic() - t0 > timeout:
            return state or {}
        time.sleep(0.25)


def metadata_diff(stored: dict, live: dict) -> list[str]:
    """Top-level notebook metadata keys whose values differ (what JupyterLab rewrote)."""
    keys = sorted(set(stored) | set(live))
    out = []
    for k in keys:
        if stored.get(k) != live.get(k):
            out.append(f"{k}: stored {json.dumps(stored.get(k))} -> lab "
                       f"{json.dumps(live.get(k))}")
    return out


def check_notebook(driver, base: str, token: str, path: Path, timeout: float,
                   screenshot: Path | None) -> list[str]:
    """Open one notebook in JupyterLab and return its failures (empty: it opens clean)."""
    want = expected(path)
    name = path.name
    driver.get(f"{base}/lab/tree/notebooks/{name}?reset&token={token}")

    def probe() -> dict | None:
        return driver.execute_script(DOM_STATE_JS, want["widget_cells"])

    try:
        state = wait_for(lambda: (s := driver.execute_script(PANEL_STATE_JS)) and s["ready"]
                         and s["path"].endswith(name) and s["status"] == "idle" and s,
                         timeout, f"{name} to open with an idle kernel")
    except TimeoutError as err:
        dom = probe() or {}
        dialogs = "; ".join(dom.get("dialogs", []))
        return [f"{name}: {err}" + (f" (dialog: {dialogs})" if dialogs else "")]

    def complete(d: dict) -> bool:  # everything stored is drawn (or something went wrong)
        return bool(d["dialogs"] or d["mathErrors"] or d["widgetErrors"]) or (
            (d["mathjax"] > 0 and not d["rawTex"] or not want["math"])
            and d["outputImagesDrawn"] >= want["images"]
            and d["markdownImagesDrawn"] >= want["markdown_images"]
            and d["widgetOutputs"] >= want["widgets"])

    dom = settled(probe, complete, quiet=2.0, timeout=timeout)
    state = driver.execute_script(PANEL_STATE_JS) or state
    fails = []
    if dom.get("dialogs"):
        fails.append(f"{name}: a dialog is open: {' | '.join(dom['dialogs'])}")
    if dom.get("dirtyTabs") or state.get("dirty"):
        diff = metadata_diff(want["metadata"], state.get("metadata") or {})
        fails.append(f"{name}: the tab is marked unsaved right after opening"
                     + (": JupyterLab rewrote " + "; ".join(diff) if diff else "")
                     + " (fix: make nb-metadata)")
    if dom.get("mathErrors"):
        fails.append(f"{name}: MathJax could not typeset: {dom['mathErrors'][:3]}")
    if dom.get("rawTex"):
        fails.append(f"{name}: markdown shows untypeset TeX: {dom['rawTex'][:3]}")
    if want["math"] and not dom.get("mathjax"):
        fails.append(f"{name}: the markdown has $...$ but nothing was typeset (no mjx-container)")
    if dom.get("outputImagesDrawn", 0) < want["images"]:
        fails.append(f"{name}: {want['images']} stored image outputs, "
                     f"{dom.get('outputImagesDrawn', 0)} drawn")
    if dom.get("markdownImagesDrawn", 0) < want["markdown_images"]:
        fails.append(f"{name}: {want['markdown_images']} markdown images, "
                     f"{dom.get('markdownImagesDrawn', 0)} drawn")
    if dom.get("widgetOutputs", 0) < want["widgets"] or dom.get("widgetErrors"):
        fails.append(f"{name}: {want['widgets']} stored widget views, "
                     f"{dom.get('widgetOutputs', 0)} rendered as .jupyter-widgets"
                     + (f"; shown instead: {dom['widgetShownInstead'][:2]}"
                        if dom.get("widgetShownInstead") else "")
                     + " (a text repr means the notebook is not trusted: make trust; "
                       "'model not found' means its metadata holds no widget state)")
    if screenshot is not None and want["widgets"]:
        el = driver.execute_script(
            "const w = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
            ".jp-OutputArea-output .jupyter-widgets');"
            "if (w) { w.scrollIntoView({block: 'center'}); } return w;")
        time.sleep(0.5)
        (el.screenshot if el is not None else driver.save_screenshot)(str(screenshot))
    print(f"  {name}: kernel {state.get('kernel')!r}, {dom.get('mathjax', 0)} formulas, "
          f"{dom.get('outputImagesDrawn', 0)}/{want['images']} images, "
          f"{dom.get('widgetOutputs', 0)}/{want['widgets']} widget views, "
          f"{'dirty' if dom.get('dirtyTabs') or state.get('dirty') else 'clean'}"
          f"{'' if not fails else ' -> FAIL'}", flush=True)
    return fails


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=list(DEFAULT_NOTEBOOKS),
                   help="notebook numbers or names (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the server and for each notebook")
    p.add_argument("--screenshot", type=Path, default=None,
                   help="save a PNG of the first widget view (notebook 08's explorer) here")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary folder (server log, failure screenshots)")
    p.add_argument("--untrusted", action="store_true",
                   help="do not trust the notebooks first (shows what an untrusted notebook "
                        "looks like: stored widget views fail)")
    p.add_argument("--find-browser", action="store_true",
                   help="only print the browser and driver found (exit 2 if none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    try:
        browser, chromedriver = find_browser()
        paths = pick_notebooks(args.only)
    except (Prerequisite, ValueError) as err:
        print(f"check-lab: {err}", file=sys.stderr)
        return 2
    if args.find_browser:
        print(f"{browser}\n{chromedriver}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="pfl-check-lab-"))
    log = tmp / "jupyterlab.log"
    proc = driver = None
    fails: list[str] = []
    try:
        env = lab_workspace(tmp, [] if args.untrusted else paths)
        proc, base, token = start_lab(tmp / "root", env, log, args.timeout)
        print(f"check-lab: JupyterLab on {base} after {time.monotonic() - t0:.0f} s "
              f"(log {log})", flush=True)
        t1 = time.monotonic()
        driver = make_driver(browser, chromedriver, (1400, 1000))
        print(f"check-lab: {browser} started in {time.monotonic() - t1:.0f} s", flush=True)
        for path in paths:
            t1 = time.monotonic()
            try:
                fails += check_notebook(driver, base, token, path, args.timeout,
                                        args.screenshot)
            except Exception as err:  # one broken notebook must not hide the others
                fails.append(f"{path.name}: {type(err).__name__}: {err}")
            if fails and fails[-1].startswith(path.name):
                shot = tmp / f"fail_{path.stem}.png"
                driver.save_screenshot(str(shot))
                args.keep = True
                fails.append(f"{path.name}: screenshot of the failure: {shot}")
            driver.get("about:blank")
            close_sessions(base, token)
            print(f"  {path.name}: {time.monotonic() - t1:.0f} s", flush=True)
    except Prerequisite as err:
        print(f"check-lab: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        fails.append(f"{type(err).__name__}: {err}")
        args.keep = True
    finally:
        if driver is not None:
            driver.quit()
        if proc is not None:
            stop_lab(proc, base, token)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - t0
    if fails:
        print(f"check-lab: FAILED ({len(paths)} notebooks, {seconds:.0f} s; files kept in "
              f"{tmp}):", file=sys.stderr)
        for f in fails:
            print(f"  {f}", file=sys.stderr)
        return 1
    print(f"check-lab: {len(paths)} notebooks open clean in JupyterLab ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
