"""Every number a notebook's prose quotes comes from that notebook's stored outputs.

The markdown of a notebook is written by hand, its outputs by running it; when the code changes
and the notebook is re-executed, the prose can go stale without any other test noticing. This
test reads the ``.ipynb`` JSON only (it runs nothing) and checks, for every numbered notebook,
that each number with a decimal point in a markdown cell (``0.79``, ``12.3``, ``77.2 %``)
appears in the same notebook's code outputs (``text/plain`` or stream text), as printed, after
rounding an output number to the quoted number of decimals, or as a percent of an output
fraction (``0.772`` -> ``77.2``).

Not checked, because they cannot be outputs: LaTeX (``$...$``, ``$$...$$``), inline and fenced
code, links, settings that appear in a code cell's source (a learning rate ``2e-2`` quoted as
0.02), and the short allowlist below, one reason per number.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))

# Numbers a notebook may quote without printing them: settings that live in pfl's configs (not
# in the notebook's code), and numbers that the text marks as another source's (the paper's).
ALLOWLIST: dict[str, dict[str, str]] = {
    "02_prompt_banks": {
        "0.02": "init std of the prompt bank (pfl.method.prompts) and of the flows' q0, a setting",
    },
    "03_planar_flows": {
        "0.01": "the paper's flow-loss weight (TrainConfig.flow_weight), a setting",
    },
    "06_evaluation": {
        "0.3": "the false-positive-rate limit of AUPRO (pfl.run.metrics), a definition",
        "91.8": "the paper's MVTec-AD pixel AUROC, marked in the text as the paper's",
        "92.3": "the paper's MVTec-AD image AUROC, marked in the text as the paper's",
    },
}

_LATEX_BLOCK = re.compile(r"\$\$.*?\$\$", re.S)
_LATEX_INLINE = re.compile(r"\$[^$]+\$")
_FENCED = re.compile(r"```.*?```", re.S)
_INLINE_CODE = re.compile(r"`[^`]*`")
_LINK = re.compile(r"https?://\S+")
# A decimal number not glued to a word or another number ("A.1", "v1.2" and "1.2.3" are no
# numbers); a minus sign counts when it starts the number ("-3.1", not the dash of "0.4-0.5").
_DECIMAL = re.compile(r"(?<![\w.])((?:(?<![\w.)\]])[-\u2212])?\d+\.\d+)(?![\w.]*\d)")
_ANY_NUMBER = re.compile(r"(?<![\w.])((?:(?<![\w.)\]])-)?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def output_text(cell: dict) -> str:
    """The text a code cell printed: stream text and ``text/plain`` results."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(_text(out.get("text", "")))
        elif "text/plain" in out.get("data", {}):
            parts.append(_text(out["data"]["text/plain"]))
    return "\n".join(parts)


def quoted_numbers(markdown: str) -> list[str]:
    """The decimal numbers a markdown cell quotes, outside LaTeX, code and links."""
    for pattern in (_LATEX_BLOCK, _FENCED, _LATEX_INLINE, _INLINE_CODE, _LINK):
        markdown = pattern.sub(" ", markdown)
    return [m.replace("\u2212", "-") for m in _DECIMAL.findall(markdown)]


def numbers_in(text: str) -> list[float]:
    out = []
    for m in _ANY_NUMBER.findall(text):
        try:
            out.append(float(m))
        except ValueError:
            continue
    return out


def backed(quoted: str, outputs: list[float], settings: list[float]) -> bool:
    """Whether ``quoted`` is an output number (as printed, rounded, or in percent of a fraction)
    or a setting of the notebook's code. An unsigned quote may stand for a negative output
    ("falls by 1.2"); a signed one needs the sign."""
    q = float(quoted)
    decimals = len(quoted.split(".")[1])
    half = 0.5 * 10.0**-decimals + 1e-9
    signed = quoted.startswith("-")
    for o in outputs:
        for v in (o, 100.0 * o):
            if abs((v if signed else abs(v)) - q) <= half:
                return True
    return any(math.isclose(s, q, rel_tol=1e-12) or math.isclose(100 * s, q, rel_tol=1e-12)
               for s in settings)


def unbacked_claims(nb: dict, allow: dict[str, str]) -> list[tuple[int, str]]:
    """(markdown cell index, number) for every quoted number that nothing backs."""
    cells = nb["cells"]
    outputs = numbers_in("\n".join(output_text(c) for c in cells if c["cell_type"] == "code"))
    settings = numbers_in("\n".join(_text(c["source"]) for c in cells if c["cell_type"] == "code"))
    bad = []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        for num in quoted_numbers(_text(cell["source"])):
            if num not in allow and not backed(num, outputs, settings):
                bad.append((i, num))
    return bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_markdown_numbers_come_from_outputs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    bad = unbacked_claims(nb, ALLOWLIST.get(path.stem, {}))
    assert not bad, "\n".join(
        f"{path.name}: markdown cell {i} quotes {num}, which no output of the notebook shows"
        for i, num in bad)


def test_allowlist_names_existing_notebooks_and_used_numbers():
    """A stale allowlist entry is a claim nobody checks any more."""
    stems = {p.stem for p in NOTEBOOKS}
    assert set(ALLOWLIST) <= stems
    for stem, allow in ALLOWLIST.items():
        nb = json.loads((NOTEBOOKS[0].parent / f"{stem}.ipynb").read_text(encoding="utf-8"))
        quoted = {n for c in nb["cells"] if c["cell_type"] == "markdown"
                  for n in quoted_numbers(_text(c["source"]))}
        assert set(allow) <= quoted, f"{stem}: allowlisted but not quoted: {set(allow) - quoted}"
        assert all(reason.strip() for reason in allow.values())


def test_the_checker_catches_and_accepts():
    """The rules on a hand-made notebook."""
    nb = {"cells": [
        {"cell_type": "code", "source": "fit(lr=2e-2)\n", "outputs": [
            {"output_type": "stream", "text": ["AUROC 0.7724 | delta -1.23\n"]},
            {"output_type": "execute_result", "data": {"text/plain": ["   0.4460\n"]}}]},
        {"cell_type": "markdown", "source": [
            "AUROC 0.77 (77.2 %), 0.446, lr 0.02, a drop of 1.2 (-1.2); $0.123$, `0.456`, "
            "Eq. A.1, 0.4-0.5 at chance. Wrong: 0.78, 1.3, -0.446, 0.9."]},
    ]}
    assert unbacked_claims(nb, {"0.5": "chance", "0.4": "chance"}) == [
        (1, "0.78"), (1, "1.3"), (1, "-0.446"), (1, "0.9")]
