"""Photographs for pretraining the tiny CLIP: find, filter and composite stamps of a Debian package.

Besides procedural patterns (:mod:`pfl.data.patterns`), the tiny CLIP
may pretrain on real photographs that an installed Debian package ships. The default source is
``tuxpaint-stamps-default``: ``<root>/<category>/.../<name>.png`` cut-out objects (RGBA, mostly
photographs) with ``<name>.txt`` beside each, whose first unprefixed line is the English
description ("An apricot."); the other lines are translations (``fr.utf8=...``). SVG stamps and
sound files are ignored: only raster PNGs are read.

Pretraining must not see the zero-shot benchmark (:mod:`pfl.data.synthetic`), so
:func:`find_photos` leaves out, each with its reason:

- any photo whose decoded pixels equal a benchmark source image (:data:`BENCHMARK_SHA256`, the
  content hashes of every source; tests/test_photos.py recomputes them from the sources);
- folders of lookalikes of the target and medical categories (:data:`EXCLUDED_FOLDERS`);
- photos whose description or file name holds a benchmark category word or a lookalike word
  (:data:`EXCLUDED_WORDS`), so no caption names a benchmark class;
- drawings and glyphs (not photographs), photos without a description, images under
  :data:`MIN_SIDE` pixels, and repeated pixels.

This module reads no benchmark image itself (pfl.clip.pretrain, which imports it, must import
nothing of the benchmark's photographs; tests/test_pretrain.py checks that).
:func:`draw_photo_pair` turns one stamp into a (normal, defective) pretraining pair: the stamp
over a low-contrast background, one defect painted by :func:`pfl.data.defects.paint_defect`.

    >>> import numpy as np
    >>> stamp = np.zeros((40, 30, 4), np.uint8); stamp[5:35, 5:25] = (200, 60, 40, 255)
    >>> n, d, m, kind = draw_photo_pair(stamp, np.random.default_rng(0), 64)
    >>> n.shape, d.shape, m.shape, bool(m.any()), bool((n[~m] == d[~m]).all())
    ((64, 64, 3), (64, 64, 3), (64, 64), True, True)
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from pfl.data.defects import paint_defect
from pfl.data.patterns import PATTERNS, pattern_image

log = logging.getLogger(__name__)

PACKAGE = "tuxpaint-stamps-default"  # the Debian package the default folder comes from
DEFAULT_ROOT = "/usr/share/tuxpaint/stamps"
INSTALL = f"apt-get install {PACKAGE}"
MIN_SIDE = 48  # px, the longer side; smaller stamps (icons) carry no texture to learn from
EVAL_AREA: tuple[float, float] = (0.002, 0.05)  # the benchmark's defect area (SynthConfig)

# SHA-256 of the decoded pixels (:func:`pixel_sha256` of the RGB image with an opaque alpha) of
# every benchmark source, pfl.data.synthetic.all_sources(); tests/test_photos.py recomputes them.
BENCHMARK_SHA256: dict[str, str] = {
    "73644cf6d876257916cf094be67812e6bd35ccc38cfade1839f2af07d6f74ecb": "skimage:astronaut",
    "7dff858620b59007bd17662bf81e4004123f177a331e283d3b9303c52f92f79e": "skimage:brick",
    "8148b84f662801617a8ff3a89ff730a73e1d3b051f155b2f5af1dd1d1d656409": "skimage:cell",
    "03ecf56a150c5bfb0ae481b8cc65f602e03ea4b39957fbc1f73669f756d7f8bc": "skimage:chelsea",
    "57ca21f3f2f15973babee56d107f9d3de27e6174cf248dcd54f9e5a66a1f96e2": "skimage:coffee",
    "bc36afd4b1c2975432d4829f5dfc25a30823e8579a70c8c028374c67c5eb6039": "skimage:coins",
    "5039c5de094bb66e70e75de78a9c0002adc74cbc035882b2a8b8be58bee0d7f9": "skimage:grass",
    "4e90b8f0fdb811efa038e4662030f567e2bb515c5af2ff05769c7bb6a1356839": "skimage:gravel",
    "220cf23b8850003b7c63c6314cffb7f979728084a14c5a68057fd8ab7e2ce50c":
        "skimage:hubble_deep_field",
    "b8f538c391a72d89eadc4bc673693295994c7e91ec5180bf8b25d4187efb0b54":
        "skimage:immunohistochemistry",
    "05dbd31612fa8eb161a074fd5f44c949322af54aa3a14e31d28e978c8c844b31": "skimage:moon",
    "349d57abc8354c08a4f06f4648779f3911a771e2378e36613e7018347ddcf0ce": "skimage:page",
    "fe44f6747b11021c6b6c36318e9796d1c1dac0277f71b6e856b99992970154a6": "skimage:retina",
    "2f10e0f5b825131d3188050fda70bf2524063e55ce3bbf2744de34b20202717a": "skimage:rocket",
    "cfaef09b10efa4ce94bcb4d8f2494117092f288e5d906e7ca55e19eaf20f90e3":
        "skimage:shepp_logan_phantom",
    "9b291d9978f3149f5585ccdd434785c78516050a7fb24ce394ac46454e571159":
        "skimage:stereo_motorcycle",
    "0c5a2c8175e31a73f5d565178a407319c9c2f658e6552d135e3e10cbc3921d63": "sklearn:china.jpg",
    "26e83c675092e46305b3cef2d5ae88b6fb5e3ab08ba879eb0b87f1255e7c52d3": "sklearn:flower.jpg",
}

# (folder, reason): a folder matches wherever its path parts appear in a photo's folder path
# ("cartoon" matches .../cartoon/ at any depth; "plants/flowers" matches that pair of parts).
EXCLUDED_FOLDERS: tuple[tuple[str, str], ...] = (
    ("space", "planets, sun, moon, lunar lander, probes: lookalikes of target moon, "
              "starfield, rocket"),
    ("animals/mammals/cats", "lions and tigers: lookalikes of target cat"),
    ("plants/flowers", "lookalikes of target flower"),
    ("medical", "medical objects: the medical domain is a zero-shot target"),
    ("people/body_parts", "an eye: lookalike of medical retina"),
    ("cartoon", "drawings, not photographs"),
    ("symbols", "glyphs, signs and coins (lookalikes of aux coins), not photographs"),
)

# (words, reason): a photo is left out when its description or file name holds one of the words
# (compared after a plural is stripped: "stars" matches "star").
EXCLUDED_WORDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("brick", "grass", "page", "coins", "coffee", "astronaut", "motorcycle"),
     "names an aux category (no caption may name a benchmark class)"),
    (("gravel", "moon", "starfield", "rocket", "cat", "flower", "pagoda"),
     "names a target category"),
    (("retina", "tissue", "cell", "phantom"), "names a medical category"),
    (("lunar", "crescent", "planet", "sun", "star", "galaxy", "nebula", "comet", "solar",
      "space", "spacewalk", "telescope"), "lookalike of target moon / starfield"),
    (("spaceship", "spacecraft", "shuttle", "lander", "satellite", "missile", "ufo"),
     "lookalike of target rocket"),
    (("kitten", "lion", "tiger", "leopard", "cheetah", "lynx", "panther", "jaguar", "cougar"),
     "lookalike of target cat"),
    (("blossom", "bloom", "petal", "bouquet", "rose", "tulip", "daisy", "daffodil", "lily",
      "orchid", "hibiscus", "marigold", "petunia", "anemone", "sunflower", "poppy",
      "dandelion", "lavender"), "lookalike of target flower"),
    (("temple", "shrine", "stupa", "palace"), "lookalike of target pagoda"),
    (("pebble", "stone", "rock"), "lookalike of target gravel"),
    (("eye", "eyeball", "iris", "pupil", "fundus"), "lookalike of medical retina"),
    (("microscope", "microscopy", "bacteria", "bacterium", "virus", "germ", "amoeba", "blood",
      "histology", "biopsy"), "lookalike of medical tissue / cell"),
    (("skull", "skeleton", "x-ray", "xray", "scan", "mri"), "lookalike of medical phantom"),
)

_LOCALISED = re.compile(r"^[A-Za-z_@]+\.utf8=")  # a translated line of a description file
_ARTICLES = {"a", "an", "the", "some", "two", "another", "our", "its", "it's", "this"}
_STOPS = {"with", "of", "in", "on", "at", "for", "from", "that", "which", "who", "is", "are",
          "was", "has", "have", "lets", "called", "made", "making", "to", "and", "or", "by",
          "as", "it", "they"}
_MEASURES = {"pair", "bunch", "group", "piece", "slice", "set", "box", "bowl", "cup", "glass",
             "plate", "bag", "basket", "handful", "loaf"}


@dataclass(frozen=True)
class PhotoSource:
    """One pretraining photograph: a PNG and its English description."""

    path: Path  # the .png file
    name: str  # path relative to the root, "/"-separated, without ".png"
    description: str  # the English line of <name>.txt
    words: tuple[str, ...]  # lower-case words of the description and the file name
    noun: str  # caption noun phrase: the description's first noun words ("candy cane")
    sha256: str  # pixel_sha256 of the decoded RGBA pixels


@dataclass(frozen=True)
class PhotoSet:
    """What :func:`find_photos` found: the photos used and the ones left out, both sorted."""

    root: str
    photos: tuple[PhotoSource, ...]
    excluded: tuple[tuple[str, str], ...]  # (relative name, reason)

    def digest(self) -> str:
        """SHA-256 over the sorted per-photo pixel hashes (one per line): the set's identity."""
        return hashlib.sha256("\n".join(sorted(p.sha256 for p in self.photos)).encode()
                              ).hexdigest()


def pixel_sha256(rgba: np.ndarray) -> str:
    """SHA-256 of an (H, W, 4) uint8 image: its shape, then its bytes (row-major)."""
    a = np.ascontiguousarray(rgba, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 4:
        raise ValueError(f"expected an (H, W, 4) image, got shape {a.shape}")
    return hashlib.sha256(f"{a.shape[0]}x{a.shape[1]}x4:".encode() + a.tobytes()).hexdigest()


@cache
def load_rgba(path: str | Path) -> np.ndarray:
    """The decoded image as (H, W, 4) uint8 RGBA (gray, palette, RGB converted by PIL)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGBA"))
    arr.setflags(write=False)  # cached: shared by every caller
    return arr


def _stem(word: str) -> str:
    """Strip a plural ending, so "stars" and "star" compare equal (both sides are stemmed)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "ch", "sh")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _tokens(text: str) -> list[str]:
    """Lower-case words; a hyphenated word gives itself and its parts ("x-ray", "x", "ray")."""
    out = []
    for w in re.findall(r"[a-z]+(?:['-][a-z]+)*", text.lower()):
        out.append(w)
        if "-" in w:
            out += w.split("-")
    return out


def _name_words(stem: str) -> list[str]:
    """Words of a file name, split at non-letters and camel case ("chineseJunk": chinese, junk)."""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", stem)]


def english_description(txt: Path) -> str:
    """The first non-empty line of a stamp's .txt that is not a translation ("xx.utf8=...")."""
    for line in txt.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        line = line.strip()
        if line and not _LOCALISED.match(line):
            return line
    return ""


def noun_phrase(description: str, max_words: int = 3) -> str:
    """The description's first noun words: leading article dropped, cut at the first
    preposition or verb of a short stop list, at most ``max_words`` words.

    >>> noun_phrase("A candy cane is a traditional Christmas treat.")
    'candy cane'
    >>> noun_phrase("A pair of cherries."), noun_phrase("An old Chinese sailing ship.")
    ('pair of cherries', 'old chinese sailing')
    """
    first = re.split(r"[.!?:;,(\u2014\u2013]", description, maxsplit=1)[0]
    words = re.findall(r"[a-z]+(?:['-][a-z]+)*", first.lower())
    while words and words[0] in _ARTICLES:
        words = words[1:]
    out: list[str] = []
    for w in words:
        if w in _STOPS and not (w == "of" and len(out) == 1 and out[0] in _MEASURES):
            break
        out.append(w)
        if len(out) == max_words:
            break
    return " ".join(out)


def _folder_match(parent: tuple[str, ...], folder: str) -> bool:
    return f"/{'/'.join(parent)}/".find(f"/{folder.strip('/')}/") >= 0


def _missing(root: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"photo folder {str(root)!r} {what}: install the default photographs with "
        f"`{INSTALL}` (Debian/Ubuntu, as root), or pass --photos a folder of "
        "<name>.png stamps each with a <name>.txt description"
    )


def find_photos(
    root: str | Path = DEFAULT_ROOT,
    folders: tuple[tuple[str, str], ...] = EXCLUDED_FOLDERS,
    words: tuple[tuple[tuple[str, ...], str], ...] = EXCLUDED_WORDS,
    banned: dict[str, str] | None = None,
    min_side: int = MIN_SIDE,
) -> PhotoSet:
    """The usable photos under ``root`` and the excluded ones with their reasons, sorted by path.

    Rules in order (the first that applies names the reason): excluded folder, no English
    description, excluded word in the description or file name, pixels equal to a benchmark
    source (``banned``: {sha256: source}, default :data:`BENCHMARK_SHA256`), longer side under
    ``min_side``, pixels equal to an earlier photo's. Raises FileNotFoundError (naming the folder
    and the install command) when ``root`` is missing or holds no PNG.
    """
    root = Path(root)
    banned = BENCHMARK_SHA256 if banned is None else banned
    if not root.is_dir():
        raise _missing(root, "does not exist")
    pngs = sorted(root.rglob("*.png"), key=lambda p: p.relative_to(root).as_posix())
    if not pngs:
        raise _missing(root, "holds no .png file")
    bad_words = {_stem(w): reason for group, reason in words for w in group}
    photos: list[PhotoSource] = []
    excluded: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for png in pngs:
        rel = png.relative_to(root).with_suffix("")
        name = rel.as_posix()
        folder = next((f"folder {f}: {r}" for f, r in folders
                       if _folder_match(rel.parent.parts, f)), None)
        if folder:
            excluded.append((name, folder))
            continue
        txt = png.with_suffix(".txt")
        desc = english_description(txt) if txt.is_file() else ""
        if not desc:
            excluded.append((name, "no English description (.txt) beside it"))
            continue
        toks = _tokens(desc) + _name_words(png.stem)
        hit = next((f"word {w!r}: {bad_words[_stem(w)]}" for w in toks
                    if _stem(w) in bad_words), None)
        if hit:
            excluded.append((name, hit))
            continue
        rgba = load_rgba(png)
        digest = pixel_sha256(rgba)
        if digest in banned:
            excluded.append((name, f"same pixels as benchmark source {banned[digest]}"))
            continue
        if max(rgba.shape[:2]) < min_side:
            h, w = rgba.shape[:2]
            excluded.append((name, f"smaller than {min_side} px ({w}x{h})"))
            continue
        if digest in seen:
            excluded.append((name, f"same pixels as {seen[digest]}"))
            continue
        seen[digest] = name
        photos.append(PhotoSource(png, name, desc, tuple(toks),
                                  noun_phrase(desc) or " ".join(_name_words(png.stem)), digest))
    if not photos:
        raise _missing(root, f"holds no usable photo ({len(excluded)} excluded)")
    log.info("%s: %d photos, %d excluded", root, len(photos), len(excluded))
    return PhotoSet(str(root), tuple(photos), tuple(excluded))


@lru_cache(maxsize=4)
def photo_set(root: str) -> PhotoSet:
    """:func:`find_photos` with the default rules, once per process and folder."""
    return find_photos(root)


def debian_package(root: str | Path) -> dict | None:
    """{"name", "version"} of the Debian package that installed ``root`` (``dpkg-query -S``,
    then ``-W``), or None when dpkg knows no package for it (a folder of one's own)."""
    try:
        owner = subprocess.run(["dpkg-query", "-S", str(Path(root).resolve())],
                               capture_output=True, text=True, check=True).stdout
        name = owner.split(":", 1)[0].split(",")[0].strip()
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"name": name, "version": version}


def photo_record(photos: PhotoSet) -> dict:
    """What a pretraining record lists about its photographs (pfl.clip.pretrain.write_record)."""
    return {
        "folder": photos.root,
        "package": debian_package(photos.root),
        "used": len(photos.photos),
        "excluded": len(photos.excluded),
        "sha256": photos.digest(),
        "sha256_of": "SHA-256 over the sorted per-photo SHA-256s of the decoded RGBA pixels, "
                     "one per line (pfl.data.photos.PhotoSet.digest)",
        "excluded_photos": dict(photos.excluded),
    }


# --- composites ---------------------------------------------------------------------------------
def background(rng: np.random.Generator, size: int, flat: float = 0.5,
               contrast: tuple[float, float] = (0.1, 0.35)) -> np.ndarray:
    """A low-contrast (size, size, 3) uint8 background: with probability ``flat`` one colour
    with faint sensor noise, else a procedural pattern pulled toward its mean colour."""
    if rng.uniform() < flat:
        img = rng.uniform(0, 255, 3) + rng.normal(0, 2, (size, size, 3))
    else:
        pat = pattern_image(PATTERNS[int(rng.integers(len(PATTERNS)))], rng, size).astype(float)
        mean = pat.mean(axis=(0, 1))
        img = mean + rng.uniform(*contrast) * (pat - mean)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def composite(stamp: np.ndarray, rng: np.random.Generator, size: int,
              scale: tuple[float, float] = (0.5, 0.95)) -> tuple[np.ndarray, np.ndarray]:
    """The RGBA ``stamp`` over a :func:`background`: (image (size, size, 3) uint8, object mask
    (size, size) bool, alpha >= 128). The stamp's longer side is ``scale`` of the image side
    (PIL Lanczos on premultiplied alpha), mirrored half the time, placed anywhere inside."""
    h, w = stamp.shape[:2]
    k = size * rng.uniform(*scale) / max(h, w)
    nw, nh = max(1, round(w * k)), max(1, round(h * k))
    layer = Image.fromarray(np.ascontiguousarray(stamp), "RGBA").convert("RGBa")
    layer = layer.resize((nw, nh), Image.LANCZOS).convert("RGBA")
    if rng.uniform() < 0.5:
        layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
    y, x = int(rng.integers(0, size - nh + 1)), int(rng.integers(0, size - nw + 1))
    canvas = Image.fromarray(background(rng, size)).convert("RGBA")
    canvas.alpha_composite(layer, (x, y))
    obj = np.zeros((size, size), bool)
    obj[y:y + nh, x:x + nw] = np.asarray(layer)[..., 3] >= 128
    return np.asarray(canvas.convert("RGB")), obj


def draw_photo_pair(stamp: np.ndarray, rng: np.random.Generator, size: int,
                    area: tuple[float, float] = EVAL_AREA, on_object: float = 0.5,
                    tries: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """One composite flawless and with one painted defect: (normal, defective, mask, kind).

    stamp: (H, W, 4) uint8 RGBA; the images are (size, size, 3) uint8, the mask (size, size)
    bool and exact (pixels change only inside it). The defect is redrawn up to ``tries`` times
    until at least ``on_object`` of it lies on the stamp (an anomaly of the object, not the
    table), else the last draw is kept. ``area``: the defect's share of the image (default the
    benchmark's evaluation range). Deterministic for the generator's state.
    """
    normal, obj = composite(stamp, rng, size)
    last = None
    for _ in range(tries):
        try:
            defective, mask, kind = paint_defect(normal, rng, area=area)
        except ValueError:  # too flat for the drawn kind: draw again
            continue
        last = (normal, defective, mask, kind)
        if (mask & obj).sum() >= on_object * mask.sum():
            break
    if last is None:
        raise RuntimeError(f"no visible defect on a photo composite after {tries} draws")
    return last
