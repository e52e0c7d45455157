"""Tests of pfl.data.photos (photo stamps for pretraining) and its use by pfl.clip.pretrain.

Every test but the last runs on a fabricated folder in the layout of tuxpaint-stamps-default
(<category>/.../<name>.png with <name>.txt), so CI needs no Debian package.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfl.clip import pretrain as P
from pfl.data import photos as ph
from pfl.data.synthetic import DOMAINS, SynthConfig, all_sources, load_source


def _stamp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (h, w, 4) RGBA cut-out: a textured ellipse on a transparent ground."""
    y, x = np.mgrid[0:h, 0:w]
    inside = ((y - h / 2) / (0.45 * h)) ** 2 + ((x - w / 2) / (0.45 * w)) ** 2 <= 1
    rgb = rng.integers(40, 216, 3) + rng.normal(0, 25, (h, w, 3))
    alpha = np.where(inside, 255, 0)[..., None]
    return np.concatenate([np.clip(rgb, 0, 255), alpha], -1).astype(np.uint8)


def _put(root: Path, name: str, pixels: np.ndarray, description: str | None) -> None:
    png = root / f"{name}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(png)
    if description is not None:
        png.with_suffix(".txt").write_text(description + "\nfr.utf8=Une traduction.\n")


@pytest.fixture(scope="module")
def stamps(tmp_path_factory) -> Path:
    """A folder in tuxpaint's layout: 3 usable photos and one of each kind of exclusion."""
    root = tmp_path_factory.mktemp("stamps")
    rng = np.random.default_rng(0)
    apple = _stamp(rng, 60, 50)
    _put(root, "food/fruit/apple", apple, "An apple.")
    _put(root, "household/tools/saw", _stamp(rng, 40, 90), "A saw with a wooden handle.")
    la = Image.fromarray(_stamp(rng, 70, 70)).convert("LA")  # gray + alpha, as many stamps
    (root / "animals/birds").mkdir(parents=True)
    la.save(root / "animals/birds/crow.png")
    (root / "animals/birds/crow.txt").write_text("de.utf8=Eine Kraehe.\nA crow.\n")
    _put(root, "seasonal/halloween/blackcat", _stamp(rng, 64, 64), "A black cat.")
    _put(root, "plants/flowers/pretty", _stamp(rng, 64, 64), "A pretty thing.")
    _put(root, "food/drinks/mug", np.asarray(Image.fromarray(load_source("skimage:coffee"))
                                             .convert("RGBA")), "A mug.")
    _put(root, "household/icon", _stamp(rng, 20, 30), "An icon.")
    _put(root, "household/second_apple", apple, "Another apple.")
    _put(root, "town/sign", _stamp(rng, 64, 64), None)
    return root


def benchmark_hashes() -> dict[str, str]:
    """{pixel hash: source} of every benchmark source, recomputed from the images."""
    out = {}
    for src in all_sources():
        rgb = load_source(src)
        out[ph.pixel_sha256(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))] = src
    return out


# --- finding and excluding ------------------------------------------------------------------
def test_find_photos_keeps_the_usable_and_names_every_exclusion(stamps):
    found = ph.find_photos(stamps)
    assert [p.name for p in found.photos] == ["animals/birds/crow", "food/fruit/apple",
                                              "household/tools/saw"]  # sorted by path
    why = dict(found.excluded)
    assert "folder plants/flowers" in why["plants/flowers/pretty"]
    assert "word 'cat'" in why["seasonal/halloween/blackcat"]
    assert why["food/drinks/mug"] == "same pixels as benchmark source skimage:coffee"
    assert why["household/icon"].startswith("smaller than 48 px")
    assert why["household/second_apple"] == "same pixels as food/fruit/apple"
    assert "no English description" in why["town/sign"]
    assert len(found.photos) + len(found.excluded) == len(list(stamps.rglob("*.png")))
    crow, apple, saw = found.photos
    assert (crow.description, crow.noun) == ("A crow.", "crow")  # translations skipped
    assert saw.noun == "saw" and apple.noun == "apple"
    # The hash is of the decoded pixels: the same as hashing what PIL decodes.
    assert apple.sha256 == ph.pixel_sha256(np.asarray(Image.open(apple.path).convert("RGBA")))
    assert found == ph.find_photos(stamps)  # deterministic


def test_set_digest_is_a_hash_of_the_sorted_photo_hashes(stamps):
    import hashlib

    found = ph.find_photos(stamps)
    lines = "\n".join(sorted(p.sha256 for p in found.photos))
    assert found.digest() == hashlib.sha256(lines.encode()).hexdigest()
    fewer = ph.PhotoSet(found.root, found.photos[:2], found.excluded)
    assert fewer.digest() != found.digest()


def test_pixel_hash_follows_pixels_not_file_bytes(tmp_path):
    rgba = _stamp(np.random.default_rng(1), 33, 21)
    Image.fromarray(rgba).save(tmp_path / "a.png", compress_level=0)
    Image.fromarray(rgba).save(tmp_path / "b.png", compress_level=9)
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert ph.pixel_sha256(ph.load_rgba(tmp_path / "a.png")) == \
        ph.pixel_sha256(ph.load_rgba(tmp_path / "b.png")) == ph.pixel_sha256(rgba)
    changed = rgba.copy()
    changed[0, 0, 0] ^= 1
    assert ph.pixel_sha256(changed) != ph.pixel_sha256(rgba)
    assert ph.pixel_sha256(rgba.reshape(21, 33, 4)) != ph.pixel_sha256(rgba)  # shape counts


def test_stored_benchmark_hashes_are_those_of_every_source():
    """The module's table (it may not load benchmark images itself) equals a fresh count."""
    assert ph.BENCHMARK_SHA256 == benchmark_hashes()


def test_used_photos_are_disjoint_from_every_benchmark_source(stamps):
    bench = benchmark_hashes()
    found = ph.find_photos(stamps)
    assert not {p.sha256 for p in found.photos} & set(bench)
    # ... and the check is the one that caught the planted copy.
    assert any("benchmark source" in r for _, r in found.excluded)


def test_every_benchmark_category_is_an_excluded_word():
    words = {ph._stem(w) for group, _ in ph.EXCLUDED_WORDS for w in group}
    names = {c.name for cats in DOMAINS.values() for c in cats}
    assert {ph._stem(n) for n in names} <= words
    assert ph.EVAL_AREA == SynthConfig().defect_area


def test_words_match_plurals_hyphens_and_file_names(tmp_path):
    rng = np.random.default_rng(2)
    _put(tmp_path, "a/stars", _stamp(rng, 50, 50), "Some stars.")
    _put(tmp_path, "a/photo", _stamp(rng, 50, 50), "An x-ray photo.")
    _put(tmp_path, "a/redRocket", _stamp(rng, 50, 50), "A red toy.")
    _put(tmp_path, "a/glass", _stamp(rng, 50, 50), "A glass.")
    found = ph.find_photos(tmp_path)
    why = dict(found.excluded)
    assert "'stars'" in why["a/stars"] and "'x-ray'" in why["a/photo"]
    assert "'rocket'" in why["a/redRocket"]
    assert [p.name for p in found.photos] == ["a/glass"]


def test_noun_phrase_and_description():
    assert ph.noun_phrase("A candy cane is a traditional Christmas treat.") == "candy cane"
    assert ph.noun_phrase("A pair of cherries.") == "pair of cherries"
    assert ph.noun_phrase("Knight. The only piece that can jump.") == "knight"
    assert ph.noun_phrase("Adenium (Desert Rose)") == "adenium"
    assert ph.noun_phrase("A box.") == "box"


def test_missing_or_empty_folder_says_which_and_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install tuxpaint-stamps-default") as e:
        ph.find_photos(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "does not exist" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .png.*apt-get install"):
        ph.find_photos(tmp_path / "empty")


# --- composites -------------------------------------------------------------------------------
def test_composite_pairs_are_deterministic_exact_and_inside_the_image():
    stamp = _stamp(np.random.default_rng(3), 50, 80)
    on_object = 0
    for seed in range(10):
        n, d, m, kind = ph.draw_photo_pair(stamp, np.random.default_rng(seed), 96)
        n2, d2, m2, kind2 = ph.draw_photo_pair(stamp, np.random.default_rng(seed), 96)
        assert np.array_equal(n, n2) and np.array_equal(d, d2) and np.array_equal(m, m2)
        assert kind == kind2
        assert n.shape == d.shape == (96, 96, 3) and n.dtype == np.uint8 and m.shape == (96, 96)
        assert m.any() and np.array_equal(n[~m], d[~m])  # the mask is exact
        lo, hi = ph.EVAL_AREA
        assert lo * 96 * 96 - 1 <= m.sum() <= hi * 96 * 96 + 1
        _, obj = ph.composite(stamp, np.random.default_rng(seed), 96)
        on_object += (m & obj).sum() >= 0.5 * m.sum()
    other = ph.draw_photo_pair(stamp, np.random.default_rng(99), 96)[0]
    assert not np.array_equal(other, n)
    # Defects are redrawn onto the object (a stamp covers ~20-55% of the image).
    assert on_object >= 8


def test_composite_keeps_the_stamp_and_a_low_contrast_background():
    stamp = np.zeros((40, 40, 4), np.uint8)
    stamp[..., :3] = (250, 10, 10)
    stamp[10:30, 10:30, 3] = 255  # an opaque red square in a transparent frame
    img, obj = ph.composite(stamp, np.random.default_rng(4), 80)
    from scipy.ndimage import binary_erosion

    core = binary_erosion(obj, iterations=6)  # Lanczos rings and blends near the edge
    assert core.any() and (np.abs(img[core].astype(int) - (250, 10, 10)) <= 3).all()
    assert 0.5 * 80 * 20 / 40 <= np.sqrt(obj.sum()) <= 0.95 * 80 * 20 / 40 + 1
    bg = img[~obj].astype(float)
    assert bg.std(axis=0).max() < 60  # low contrast, far below the stamp-to-ground change


# --- pretraining with photos ------------------------------------------------------------------
def test_photo_share_zero_leaves_the_pattern_stream_unchanged(stamps):
    assert P.PretrainConfig().photo_share == 0.0 and P.PretrainConfig().photos is None
    plain = P.PretrainConfig(batch=3, image_size=56)
    with_folder = P.PretrainConfig(batch=3, image_size=56, photos=str(stamps), photo_share=0.0)
    for step in (0, 5):
        a, b = P.make_batch(plain, step), P.make_batch(with_folder, step)
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
        assert a.captions == b.captions and a.kinds == b.kinds


def test_photo_pairs_in_batches(stamps):
    nouns = {p.noun for p in ph.find_photos(stamps).photos}
    cfg = P.PretrainConfig(batch=4, image_size=56, photos=str(stamps), photo_share=1.0)
    b = P.make_batch(cfg, 3)
    for k in range(4):
        noun, sn, sd = b.patterns[2 * k], b.states[2 * k], b.states[2 * k + 1]
        mask = b.masks[2 * k + 1].bool().numpy()
        assert noun in nouns and b.patterns[2 * k + 1] == noun
        assert b.masks[2 * k].sum() == 0 and mask.any()
        assert np.array_equal(b.images[2 * k].numpy()[:, ~mask],
                              b.images[2 * k + 1].numpy()[:, ~mask])
        assert any(t.format(sn.format(noun)) == b.captions[2 * k]
                   and t.format(sd.format(noun)) == b.captions[2 * k + 1] for t in P.TEMPLATES)
        assert sn in P.NORMAL_STATES and sd not in P.NORMAL_STATES
    again = P.make_batch(cfg, 3)
    assert torch.equal(again.images, b.images) and again.captions == b.captions
    half = P.make_batch(P.PretrainConfig(batch=8, image_size=56, photos=str(stamps),
                                         photo_share=0.5), 0)
    assert set(half.patterns) & nouns and set(half.patterns) & set(P.PATTERNS)


def test_config_refuses_a_share_without_photos():
    with pytest.raises(ValueError, match="needs a photo folder.*--photos"):
        P.PretrainConfig(photo_share=0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.PretrainConfig(photos="x", photo_share=1.5)


def test_cli_passes_photo_flags(stamps):
    from pfl.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--photos", str(stamps),
                                      "--photo-share", "0.25"])
    assert (args.photos, args.photo_share) == (str(stamps), 0.25)
    cfg = P.PretrainConfig(photos=str(stamps), photo_share=0.25)
    assert f"--photos {stamps} --photo-share 0.25" in P.command_line(cfg)


def test_two_step_pretrain_with_photos_records_them(stamps, tmp_path):
    cfg = P.PretrainConfig(steps=2, batch=2, image_size=28, final_size=None, warmup=1,
                           checkpoint_every=1, photos=str(stamps), photo_share=0.5)
    history = P.pretrain(cfg, tmp_path, progress=False)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    record = json.loads((tmp_path / "tiny_clip.json").read_text())
    found = ph.find_photos(stamps)
    photos = record["photos"]
    assert photos["folder"] == str(stamps) and photos["package"] is None  # not from dpkg
    assert (photos["used"], photos["excluded"]) == (3, 6)
    assert photos["sha256"] == found.digest()
    assert photos["excluded_photos"] == dict(found.excluded)
    assert record["config"]["photo_share"] == 0.5
    assert P.sha256(tmp_path / "tiny_clip.safetensors") == record["sha256"]


# --- the installed package ------------------------------------------------------------------
REAL = Path(ph.DEFAULT_ROOT)


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{ph.PACKAGE} is not installed "
                    f"({ph.INSTALL} to run this check on the real stamps)")
def test_installed_stamps_are_disjoint_from_the_benchmark():
    found = ph.find_photos(REAL)
    assert found.photos
    assert not {p.sha256 for p in found.photos} & set(benchmark_hashes())
    names = {ph._stem(c.name) for cats in DOMAINS.values() for c in cats}
    for p in found.photos:
        assert not {ph._stem(w) for w in p.words} & names, p.name
        assert not p.name.startswith(("space/", "plants/flowers/", "animals/mammals/cats/")), \
            p.name
    package = ph.debian_package(REAL)
    assert package is not None and package["name"] == ph.PACKAGE and package["version"]
