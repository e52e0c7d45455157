"""Regenerating figures (pfl.viz.figures, ``python -m pfl figures``) and stable figure bytes."""

from __future__ import annotations

import hashlib
import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from pfl import cli, viz  # noqa: E402
from pfl.config import repo_root  # noqa: E402
from pfl.viz import figures


def _summary() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for sym, values in (("B", (1, 2, 3)), ("K", (1, 5, 10))):
        for v in values:
            rows.append({"param": sym, "symbol": sym, "value": v, "n": 2,
                         "pixel_pro_mean": rng.random(), "pixel_pro_std": 0.1 * rng.random(),
                         "image_ap_mean": rng.random(), "image_ap_std": 0.1 * rng.random()})
    return pd.DataFrame(rows)


def _write_notebook(path, *cells):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


def test_save_figure_bytes_repeat_for_the_same_figure_and_a_rebuilt_one(tmp_path):
    fig = viz.plot_sweep(_summary())
    a = viz.save_figure(fig, tmp_path / "a.png", csv=_summary().round(4))
    b = viz.save_figure(fig, tmp_path / "b.png", csv=_summary().round(4))
    plt.close(fig)
    fig2 = viz.plot_sweep(_summary())  # built again from the same data
    c = viz.save_figure(fig2, tmp_path / "c.png", csv=_summary().round(4))
    plt.close(fig2)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert a.with_suffix(".csv").read_bytes() == c.with_suffix(".csv").read_bytes()
    # No timestamp or software chunk: the PNG's text chunks carry nothing that changes.
    assert b"tIME" not in a.read_bytes() and b"Software" not in a.read_bytes()


def test_other_figure_functions_are_stable_too(tmp_path):
    rng = np.random.default_rng(1)
    coords = [rng.normal(size=(6, 2)), rng.normal(size=(6, 2))]
    cats = ["x", "y", "z"] * 2
    table = pd.DataFrame({"tower": ["t"] * 4, "size": [56, 56, 112, 112], "seed": [0, 1] * 2,
                          "image_auroc": rng.random(4), "pixel_auroc": rng.random(4)})
    digests = []
    for _ in range(2):
        out = []
        for fig in (viz.plot_tsne_draws(coords, cats),
                    viz.plot_size_table(table, ["image_auroc", "pixel_auroc"])):
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=60, metadata={"Software": None})
            plt.close(fig)
            out.append(hashlib.sha256(buf.getvalue()).hexdigest())
        digests.append(out)
    assert digests[0] == digests[1]


def test_notebooks_run_in_number_order_and_only_picks(tmp_path):
    for name in ("10_last.ipynb", "02_b.ipynb", "00b_c.ipynb", "00_a.ipynb", "notes.ipynb",
                 "02_a.ipynb"):
        (tmp_path / name).write_text("{}")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    names = [p.name for p in figures.numbered_notebooks(tmp_path)]
    assert names == ["00_a.ipynb", "00b_c.ipynb", "02_a.ipynb", "02_b.ipynb", "10_last.ipynb"]
    assert [p.name for p in figures.numbered_notebooks(tmp_path, ["02"])] == [
        "02_a.ipynb", "02_b.ipynb"]
    assert [p.name for p in figures.numbered_notebooks(tmp_path, ["10_last"])] == [
        "10_last.ipynb"]
    with pytest.raises(ValueError, match="99"):
        figures.numbered_notebooks(tmp_path, ["99"])


def test_figure_sources_name_the_code_cell_and_section(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Title\n## First part"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell('save_figure(fig, FIG / "05_maps.png", csv=t)'),
        nbformat.v4.new_markdown_cell("## Second part"),
        nbformat.v4.new_code_cell('t.to_csv("../figures/05_table.csv")  # 05_maps.png again'),
    ])
    nbformat.write(nb, tmp_path / "05_demo.ipynb")
    rows = figures.figure_sources(tmp_path)
    assert rows == [
        {"file": "05_maps.png", "notebook": "05_demo.ipynb", "cell": 2, "section": "First part"},
        {"file": "05_table.csv", "notebook": "05_demo.ipynb", "cell": 3,
         "section": "Second part"},
        {"file": "05_maps.png", "notebook": "05_demo.ipynb", "cell": 3,
         "section": "Second part"},
    ]


def test_clean_keeps_the_readme_and_digests_cover_png_and_csv(tmp_path):
    for name, data in (("01_a.png", b"a"), ("01_a.csv", b"b"), ("README.md", b"r")):
        (tmp_path / name).write_bytes(data)
    d = figures.digests(tmp_path)
    assert d == {"01_a.csv": hashlib.sha256(b"b").hexdigest(),
                 "01_a.png": hashlib.sha256(b"a").hexdigest()}
    removed = figures.clean(tmp_path)
    assert sorted(p.name for p in removed) == ["01_a.csv", "01_a.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_kernel_env_sets_profile_and_one_thread_unless_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    env = figures.kernel_env("paper")
    assert env["PFL_PROFILE"] == "paper"
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="unknown profile"):
        figures.kernel_env("large")


def test_cli_dry_run_and_bad_choice(tmp_path, capsys):
    for name in ("01_x.ipynb", "00_y.ipynb"):
        (tmp_path / name).write_text("{}")
    assert cli.main(["figures", "--dry-run", "--notebooks", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == ["00_y.ipynb", "01_x.ipynb"]
    assert cli.main(["figures", "--dry-run", "--notebooks", str(tmp_path), "--only", "7"]) == 2
    assert "no notebook" in capsys.readouterr().err


def test_readme_lists_every_figure_of_notebook_08():
    readme = (repo_root() / "figures" / "README.md").read_text()
    rows = [r for r in figures.figure_sources() if r["notebook"].startswith("08_")]
    assert rows, "notebook 08 writes no figure?"
    for r in rows:
        assert r["file"] in readme
        assert r["file"].replace(".png", ".csv") in readme


@pytest.mark.slow
def test_regenerate_runs_in_order_and_rebuilds_identical_bytes(tmp_path):
    nbs, figs = tmp_path / "notebooks", tmp_path / "figures"
    nbs.mkdir()
    figs.mkdir()
    (figs / "README.md").write_text("keep")
    (figs / "stale.png").write_bytes(b"old")
    body = ("import numpy as np, pandas as pd, matplotlib\nmatplotlib.use('Agg')\n"
            "import matplotlib.pyplot as plt\nfrom pfl.viz.plots import save_figure\n"
            "rng = np.random.default_rng(0)\nx = rng.normal(size=50)\n"
            "fig, ax = plt.subplots(figsize=(2, 2)); ax.hist(x)\n")
    _write_notebook(nbs / "00_first.ipynb", body + "save_figure(fig, '../figures/00_hist.png', "
                    "csv=pd.DataFrame({'x': x.round(4)}))\nopen('../figures/order.txt', 'w')"
                    ".write('00')")
    _write_notebook(nbs / "01_second.ipynb", "import os\nprint(os.environ['PFL_PROFILE'], "
                    "os.environ['OMP_NUM_THREADS'])\n"
                    "assert open('../figures/order.txt').read() == '00'\n"
                    "open('../figures/order.txt', 'a').write('01')")
    sums = []
    for _ in range(2):
        runs = figures.regenerate(nbs, figs, profile="smoke", clean_first=True, log=None)
        assert [r.notebook for r in runs] == ["00_first.ipynb", "01_second.ipynb"]
        assert not (figs / "stale.png").exists() and (figs / "README.md").exists()
        assert (figs / "order.txt").read_text() == "0001"
        sums.append(figures.digests(figs))
    assert sums[0] == sums[1] and set(sums[0]) == {"00_hist.csv", "00_hist.png"}


# Opening clean in JupyterLab 4: it rewrites kernelspec and language_info on open (a tab
# with a different stored value opens unsaved) and draws widget views from saved state.

_LAB = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                       "language": "python"},
        "language_info": {"name": "python", "version": "3.11.7", "mimetype": "text/x-python",
                          "codemirror_mode": {"name": "ipython", "version": 3},
                          "pygments_lexer": "ipython3", "nbconvert_exporter": "python",
                          "file_extension": ".py"}}


def test_normalize_metadata_sets_what_lab_writes_and_keeps_the_rest():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
    nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3",
                                       "language": "python"},
                        "language_info": {**_LAB["language_info"], "version": "3.11.2"},
                        "widgets": {"kept": True}})
    assert figures.normalize_metadata(nb, _LAB) == ["kernelspec", "language_info"]
    assert {k: nb.metadata[k] for k in _LAB} == _LAB and nb.metadata["widgets"] == {"kept": True}
    _LAB["kernelspec"]["display_name"] = "changed later"  # a copy is stored, not the dict
    try:
        assert nb.metadata["kernelspec"]["display_name"] == "Python 3 (ipykernel)"
    finally:
        _LAB["kernelspec"]["display_name"] = "Python 3 (ipykernel)"
    assert figures.normalize_metadata(nb, _LAB) == []


def test_normalize_notebooks_rewrites_metadata_only_and_leaves_clean_files(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(figures, "kernel_metadata", lambda kernel_name="python3": _LAB)
    stale, clean = tmp_path / "01_stale.ipynb", tmp_path / "02_clean.ipynb"
    _write_notebook(stale, "print('hi')")
    nb = nbformat.read(stale, as_version=4)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="hi\n")]
    nbformat.write(nb, stale)
    nb.metadata.update(_LAB)
    nbformat.write(nb, clean)
    before_cells = nbformat.read(stale, as_version=4).cells
    clean_stat = clean.stat()
    assert figures.normalize_notebooks([stale, clean], write=False, log=None) == {
        "01_stale.ipynb": ["kernelspec", "language_info"]}
    assert nbformat.read(stale, as_version=4).metadata["kernelspec"]["display_name"] == "Python 3"
    changed = figures.normalize_notebooks([stale, clean], log=None)
    assert changed == {"01_stale.ipynb": ["kernelspec", "language_info"]}
    after = nbformat.read(stale, as_version=4)
    assert after.cells == before_cells and {k: after.metadata[k] for k in _LAB} == _LAB
    # The clean notebook was not rewritten (same inode and mtime: atomic writes replace files).
    assert (clean.stat().st_ino, clean.stat().st_mtime_ns) == (clean_stat.st_ino,
                                                               clean_stat.st_mtime_ns)
    assert figures.normalize_notebooks([stale, clean], write=False, log=None) == {}


def test_a_missing_kernel_is_named_with_the_fix():
    with pytest.raises(FileNotFoundError, match="ipykernel install --sys-prefix --name nope"):
        figures.kernelspec_metadata("nope")


def test_committed_notebooks_carry_what_the_installed_kernel_writes():
    """The unsaved-on-open bug of issue #14 without a browser: JupyterLab replaces kernelspec
    with the installed spec's and language_info with the kernel's (ipykernel's, for this
    Python); any difference marks the tab dirty. ``make nb-metadata`` fixes a failure."""
    from ipykernel.ipkernel import IPythonKernel

    spec = figures.kernelspec_metadata()
    info = dict(IPythonKernel.language_info)
    version = info.pop("version")
    for path in figures.numbered_notebooks(figures.default_dirs()[0]):
        meta = nbformat.read(path, as_version=4).metadata
        assert meta["kernelspec"] == spec, f"{path.name}: run make nb-metadata"
        stored = dict(meta["language_info"])
        # The patch version is the executing machine's Python; the rest must match exactly.
        assert stored.pop("version").split(".")[:2] == version.split(".")[:2], path.name
        assert stored == info, f"{path.name}: run make nb-metadata"


@pytest.mark.slow
def test_kernel_metadata_is_what_a_started_kernel_reports():
    import platform

    lab = figures.kernel_metadata()
    assert lab["kernelspec"] == figures.kernelspec_metadata()
    assert lab["language_info"]["name"] == "python"
    assert lab["language_info"]["version"] == platform.python_version()  # the venv's kernel


@pytest.mark.slow
def test_execute_notebook_stores_the_installed_kernelspec_and_this_runs_widgets(tmp_path):
    path = tmp_path / "09_widgets.ipynb"
    _write_notebook(path, "import ipywidgets as w\nw.IntSlider(value=3, description='R')")
    nb = nbformat.read(path, as_version=4)
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {
        "state": {"stale": {"model_name": "OldModel"}}, "version_major": 2, "version_minor": 0}}
    nbformat.write(nb, path)
    figures.execute_notebook(path, save=True, timeout=120)
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"] == figures.kernelspec_metadata()
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert "stale" not in state
    sliders = [m["state"] for m in state.values() if m["model_name"] == "IntSliderModel"]
    assert len(sliders) == 1 and sliders[0]["value"] == 3 and sliders[0]["description"] == "R"
    view = nb.cells[0].outputs[-1]["data"]["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] in state  # the stored view points at a stored model
