"""Regenerate every figure: execute the numbered notebooks in order, in the active profile.

``python -m pfl figures`` (and ``make figures``) runs ``notebooks/NN_*.ipynb`` one after the
other in a fresh kernel each (:mod:`nbclient`), with ``PFL_PROFILE`` set for the kernel and
the working folder ``notebooks/`` (where the notebooks write ``../figures``). The figures
and the CSVs behind them are the notebooks' side effects (:func:`pfl.viz.plots.save_figure`), so
``figures/`` ends up exactly as the notebooks make it. ``clean=True`` first removes every PNG
and CSV in ``figures/`` (``README.md`` stays), to rebuild from a clean state.

Byte-identical reruns on one machine: ``save_figure`` writes PNGs with a fixed dpi and no
timestamp or software metadata, the notebooks seed every draw, and the kernels run with one
BLAS/OpenMP thread (``OMP_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1`` unless already set; the
Makefile exports the same), because a different thread count can change float sums in
the last bits. Figures of timings would break this; the notebooks keep timings out of them.
:func:`digests` hashes ``figures/`` to compare two runs.

The executed notebooks are not written back unless ``save=True`` (their stored outputs are
what ``pytest --nbval`` compares against, in the smoke profile).

Opening clean in JupyterLab 4. On open, JupyterLab starts the notebook's kernel and writes
its ``kernelspec`` (name, display name and language of the installed spec) and
``language_info`` (exactly as the kernel reports it) into the notebook; a value that differs
from the stored one marks the tab unsaved at once. :func:`normalize_notebooks` stores what
the installed kernel would write (``make nb-metadata``), and :func:`execute_notebook` does the
same for the notebooks it saves. It also stores the state of the widgets the notebook made
(``widgets`` metadata), which JupyterLab needs to draw a stored widget view without running
the notebook; it draws them only in a trusted notebook (``jupyter trust``, done by
``make trust`` / ``make lab``), and shows their text repr otherwise.

>>> FIGURE_NAME.findall('save_figure(fig, FIG / "08_sweeps.png", csv=s)  # 00b_x.csv')
['08_sweeps.png', '00b_x.csv']
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pfl.config import PROFILES, repo_root
from pfl.utils import atomic_write

NOTEBOOK_NAME = re.compile(r"^(\d+)[a-z]?_[^/]*\.ipynb$")  # 00_x, 00b_y (after 00_x), 01_z
FIGURE_NAME = re.compile(r"\b(\d\d[a-z]?_[A-Za-z0-9_\-]+\.(?:png|csv))\b")
FIGURE_SUFFIXES = (".png", ".csv")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
KERNEL_NAME = "python3"  # the kernel `make` installs (ipykernel install --name python3)


def default_dirs() -> tuple[Path, Path]:
    """``(notebooks/, figures/)`` of the checkout."""

    return repo_root() / "notebooks", repo_root() / "figures"


def numbered_notebooks(notebooks_dir: str | Path, only: Sequence[str] | None = None
                       ) -> list[Path]:
    """The ``NN_*.ipynb`` (and ``NNb_*.ipynb``) notebooks of a folder, by number then name.

    ``only``: numbers or name stems to keep (``["08"]``, ``["03_planar_flows"]``); a name that
    matches nothing is an error.
    """
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"notebook folder {folder} does not exist")
    found = sorted((int(m.group(1)), p.name, p) for p in folder.iterdir()
                   if (m := NOTEBOOK_NAME.match(p.name)))
    paths = [p for _, _, p in found]
    if only:
        wanted = {str(o).removesuffix(".ipynb") for o in only}
        keep = [p for p in paths if p.stem in wanted or p.stem.split("_", 1)[0] in wanted]
        matched = {w for w in wanted for p in keep if p.stem == w or p.stem.split("_", 1)[0] == w}
        missing = sorted(wanted - matched)
        if missing:
            raise ValueError(f"no notebook in {folder} matches {missing}; there are "
                             f"{[p.stem for p in paths]}")
        paths = keep
    return paths


def figure_files(figures_dir: str | Path) -> list[Path]:
    """The PNG and CSV files of ``figures_dir``, sorted by name."""
    folder = Path(figures_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in FIGURE_SUFFIXES)


def clean(figures_dir: str | Path) -> list[Path]:
    """Remove every PNG and CSV of ``figures_dir`` (not README.md); return what was removed."""
    removed = figure_files(figures_dir)
    for p in removed:
        p.unlink()
    return removed


def digests(figures_dir: str | Path) -> dict[str, str]:
    """``{file name: sha256}`` of every figure and CSV, to compare two runs byte for byte."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in figure_files(figures_dir)}


def kernel_env(profile: str | None = None, threads: int | None = 1) -> dict[str, str]:
    """The kernel's environment: this one, with ``PFL_PROFILE`` (when given) and one BLAS
    thread unless the thread variables are already set (``threads=None`` leaves them)."""
    env = dict(os.environ)
    if profile is not None:

        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}: choose one of {PROFILES}")
        env["PFL_PROFILE"] = profile
    if threads is not None:
        for var in THREAD_VARS:
            env.setdefault(var, str(threads))
    return env


def kernelspec_metadata(kernel_name: str = KERNEL_NAME) -> dict[str, str]:
    """The ``kernelspec`` metadata JupyterLab 4 writes into a notebook it opens on the
    installed kernel ``kernel_name``: its name, display name and language (for the spec that
    ``make`` installs, ``{"name": "python3", "display_name": "Python 3 (ipykernel)",
    "language": "python"}``).

    Raises:
        FileNotFoundError: no kernel of that name is installed.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel as err:
        raise FileNotFoundError(
            f"no Jupyter kernel named {kernel_name!r} is installed: install it with `python -m "
            f"ipykernel install --sys-prefix --name {kernel_name}` (make does)") from err
    return {"name": kernel_name, "display_name": spec.display_name, "language": spec.language}


def kernel_metadata(kernel_name: str = KERNEL_NAME, timeout: float = 120) -> dict[str, dict]:
    """``{"kernelspec": ..., "language_info": ...}`` exactly as JupyterLab 4 writes them when
    it opens a notebook on ``kernel_name``: the spec of :func:`kernelspec_metadata`, and the
    ``language_info`` of the kernel's own ``kernel_info_reply`` (a kernel is started for it, a
    few seconds; ``version`` is the kernel's Python, e.g. ``3.11.7``)."""
    from jupyter_client.manager import start_new_kernel

    spec = kernelspec_metadata(kernel_name)
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=timeout)
    try:
        reply = kc.kernel_info(reply=True, timeout=timeout)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return {"kernelspec": spec, "language_info": reply["content"]["language_info"]}


def normalize_metadata(nb, lab: dict[str, dict]) -> list[str]:
    """Store in ``nb.metadata`` each key of ``lab`` (from :func:`kernel_metadata`), so that
    JupyterLab finds nothing to rewrite on open; return the keys whose value changed.

    >>> import nbformat
    >>> nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3",
    ...     "display_name": "Python 3", "language": "python"}})
    >>> lab = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
    ...                       "language": "python"}}
    >>> normalize_metadata(nb, lab), normalize_metadata(nb, lab)
    (['kernelspec'], [])
    """
    changed = []
    for key, value in lab.items():
        if nb.metadata.get(key) != value:
            nb.metadata[key] = copy.deepcopy(value)
            changed.append(key)
    return changed


def normalize_notebooks(paths: Sequence[str | Path] | None = None, *,
                        kernel_name: str = KERNEL_NAME, write: bool = True,
                        log: Callable[[str], None] | None = print) -> dict[str, list[str]]:
    """Store in each notebook (default: every numbered one) the ``kernelspec`` and
    ``language_info`` the installed kernel writes on open (:func:`kernel_metadata`), so
    JupyterLab opens it with its tab clean. Only the metadata changes (cells and outputs stay
    byte for byte); a changed notebook is rewritten atomically, an unchanged one not at all.
    ``write=False`` only reports. Returns ``{notebook name: changed keys}`` for the notebooks
    that differ(ed).
    """
    import nbformat

    paths = [Path(p) for p in paths] if paths is not None else numbered_notebooks(
        default_dirs()[0])
    lab = kernel_metadata(kernel_name)
    changed = {}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        keys = normalize_metadata(nb, lab)
        if keys:
            changed[path.name] = keys
            if write:
                atomic_write(path, lambda tmp, nb=nb: nbformat.write(nb, tmp))
        if log:
            done = " set" if write else " differ"
            log(f"{path.name}: {', '.join(keys) + done if keys else 'clean'}")
    return changed


def execute_notebook(path: str | Path, *, env: dict[str, str] | None = None,
                     timeout: int = 900, save: bool = False, kernel_name: str = KERNEL_NAME
                     ) -> float:
    """Run one notebook top to bottom in a fresh kernel whose working folder is the
    notebook's; return the wall-clock seconds. ``save``: write the outputs back (atomically).

    The notebook keeps what JupyterLab needs to open it clean and draw its widgets: the
    kernel's ``language_info`` (nbclient stores it), the installed ``kernelspec``
    (:func:`kernelspec_metadata`) and the state of this run's widgets (``widgets`` metadata;
    a previous run's state is dropped first, so none is left when the notebook no longer
    makes widgets).

    Raises:
        nbclient.exceptions.CellExecutionError naming the cell when a cell fails.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute(env=env if env is not None else kernel_env())
    seconds = time.perf_counter() - t0
    nb.metadata["kernelspec"] = kernelspec_metadata(kernel_name)
    if save:

        atomic_write(path, lambda tmp: nbformat.write(nb, tmp))
    return seconds


@dataclass
class Run:
    """One executed notebook and how long it took (seconds, machine-dependent)."""

    notebook: str
    seconds: float


def regenerate(notebooks_dir: str | Path | None = None, figures_dir: str | Path | None = None,
               *, profile: str | None = None, only: Sequence[str] | None = None,
               clean_first: bool = False, save: bool = False, timeout: int = 900,
               threads: int | None = 1, log: Callable[[str], None] | None = print
               ) -> list[Run]:
    """Execute every numbered notebook in order (or those in ``only``), which rewrites every
    figure and its CSV in ``figures_dir``; return the runs.

    Args:
        profile: ``smoke`` | ``paper`` for the kernels (None: this process's ``PFL_PROFILE``,
            else smoke).
        clean_first: remove every PNG/CSV of ``figures_dir`` first (a clean rebuild).
        save: write the executed notebooks back (smoke only: their outputs are compared by
            nbval).
        threads: BLAS/OpenMP threads of the kernels when not set in the environment.
    """
    default_nb, default_fig = default_dirs()
    notebooks_dir = Path(notebooks_dir or default_nb)
    figures_dir = Path(figures_dir or default_fig)
    paths = numbered_notebooks(notebooks_dir, only)
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {notebooks_dir}")
    env = kernel_env(profile, threads)
    if save and env.get("PFL_PROFILE", "smoke") != "smoke":
        raise ValueError("save=True would store paper-profile outputs in the notebooks, which "
                         "nbval compares in the smoke profile; regenerate without save")
    if clean_first:
        removed = clean(figures_dir)
        if log:
            log(f"removed {len(removed)} files from {figures_dir}")
    runs = []
    for path in paths:
        if log:
            log(f"running {path.name} (profile {env.get('PFL_PROFILE', 'smoke')}) ...")
        seconds = execute_notebook(path, env=env, timeout=timeout, save=save)
        runs.append(Run(path.name, seconds))
        if log:
            log(f"  {path.name}: {seconds:.1f} s")
    return runs


def figure_sources(notebooks_dir: str | Path | None = None) -> list[dict]:
    """Where each figure file is written: one row per (file, notebook, code cell).

    Scans the code cells for ``NN_name.png`` / ``.csv`` literals. ``cell`` counts code cells
    from 1 (the ``In [n]`` label of a notebook run top to bottom); ``section`` is the last
    Markdown heading above it.
    """
    import nbformat

    rows = []
    for path in numbered_notebooks(notebooks_dir or default_dirs()[0]):
        nb = nbformat.read(path, as_version=4)
        section, code = "", 0
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                heads = [ln.lstrip("#").strip() for ln in cell.source.splitlines()
                         if ln.startswith("#")]
                section = heads[-1] if heads else section
            elif cell.cell_type == "code":
                code += 1
                for name in dict.fromkeys(FIGURE_NAME.findall(cell.source)):
                    rows.append({"file": name, "notebook": path.name, "cell": code,
                                 "section": section})
    return rows
