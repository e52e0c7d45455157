"""Tests of pfl.clip.pretrain: the losses against references, the shipped record, leaks, resume."""

import builtins
import dataclasses
import io
import json
import math
import shlex
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pfl import config
from pfl.clip import pretrain as P
from pfl.clip.backbone import ASSETS, TOWERS, load_weights, tower_record
from pfl.data import photos as PH
from pfl.run.features import pattern_store
from pfl.utils import default_dtype

RECORD = ASSETS / "tiny_clip.json"
shipped = pytest.mark.skipif(not RECORD.is_file(), reason="no shipped tiny CLIP record yet")
each_tower = pytest.mark.parametrize("tower", sorted(TOWERS))


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# --- losses ---------------------------------------------------------------------------------
def test_soft_clip_loss_is_clip_loss_when_captions_are_unique():
    img, txt = _unit(6, 8), _unit(6, 8, seed=1)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    ours = P.soft_clip_loss(img, txt, torch.arange(6), scale)
    ref = open_clip.loss.ClipLoss()(img, txt, scale.exp())
    assert torch.allclose(ours, ref, atol=1e-12)


def test_soft_clip_loss_counts_equal_captions_as_positives():
    img, txt = _unit(5, 4), _unit(5, 4, seed=2)
    labels = torch.tensor([0, 1, 0, 2, 1])
    scale = torch.tensor(1.3, dtype=torch.float64)
    logits = (scale.exp() * img @ txt.T).numpy()
    ref = 0.0
    for mat in (logits, logits.T):  # brute force, row by row
        for i in range(5):
            pos = [j for j in range(5) if labels[j] == labels[i]]
            logp = mat[i] - np.log(np.exp(mat[i]).sum())
            ref += -np.mean(logp[pos]) / 10
    assert P.soft_clip_loss(img, txt, labels, scale).item() == pytest.approx(ref, abs=1e-12)


def test_dense_loss_is_class_balanced_bce():
    patches, tn, td = _unit(2, 6, 4), _unit(2, 4, seed=1), _unit(2, 4, seed=2)
    frac = torch.tensor([[0, 0, 0.5, 1, 0, 0], [0.25, 0, 0, 0, 0, 0]], dtype=torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64)
    logit = scale.exp() * ((patches * td[:, None]).sum(-1) - (patches * tn[:, None]).sum(-1))
    pos = F.binary_cross_entropy_with_logits(logit, torch.ones_like(frac), weight=frac,
                                             reduction="sum") / frac.sum()
    neg = F.binary_cross_entropy_with_logits(logit, torch.zeros_like(frac), weight=1 - frac,
                                             reduction="sum") / (1 - frac).sum()
    ours = P.dense_loss(patches, tn, td, frac, scale)
    assert torch.allclose(ours, 0.5 * (pos + neg), atol=1e-12)


def test_dense_term_pulls_defect_patches_to_the_defect_text():
    """One gradient step on the tokens: inside the mask toward t_d, outside toward t_n."""
    tn, td = _unit(1, 8, seed=3), _unit(1, 8, seed=4)
    patches = _unit(1, 10, 8, seed=5).requires_grad_(True)
    frac = torch.zeros(1, 10, dtype=torch.float64)
    frac[0, :3] = 1.0
    margin = lambda p: (F.normalize(p, dim=-1) @ (td - tn).T)[0, :, 0]  # noqa: E731
    before = margin(patches).detach()
    P.dense_loss(patches, tn, td, frac, torch.tensor(0.0, dtype=torch.float64)).backward()
    after = margin(patches.detach() - 0.1 * patches.grad)
    assert (after[:3] > before[:3]).all() and (after[3:] < before[3:]).all()


def test_patch_fractions_match_a_loop():
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(2, 28, 42, generator=g) > 0.7).float()
    got = P.patch_fractions(m, 14)
    ref = [[m[n, i:i + 14, j:j + 14].mean().item() for i in (0, 14) for j in (0, 14, 28)]
           for n in range(2)]
    assert torch.allclose(got, torch.tensor(ref), atol=1e-6)


def test_learning_rate_warmup_then_cosine():
    c = P.PretrainConfig(steps=200, warmup=10, lr=2.0, min_lr_ratio=0.1, final_steps=20)
    assert P.learning_rate(c, 4) == pytest.approx(1.0)
    assert P.learning_rate(c, 10) == pytest.approx(2.0)
    assert P.learning_rate(c, 200) == pytest.approx(0.2)


# --- data and leaks ---------------------------------------------------------------------------
def test_batches_are_pairs_with_exact_masks():
    cfg = P.PretrainConfig(batch=3, image_size=56, zoom=0.5)
    b = P.make_batch(cfg, step=7)
    imgs = b.images.numpy()
    for k in range(3):
        normal, defect, mask = imgs[2 * k], imgs[2 * k + 1], b.masks[2 * k + 1].bool().numpy()
        assert b.masks[2 * k].sum() == 0 and mask.any()
        # The defect changes pixels inside its mask only: the pair is one image.
        assert np.array_equal(normal[:, ~mask], defect[:, ~mask])
        # Captions differ in the state phrase alone.
        assert b.patterns[2 * k] == b.patterns[2 * k + 1] and b.kinds[2 * k + 1] in P.KIND_STATES
        # Captions differ in the state phrase alone: one template and one noun fill both.
        pat, sn, sd = b.patterns[2 * k], b.states[2 * k], b.states[2 * k + 1]
        nouns = [f"{pat} pattern", f"{pat} texture", pat, *P.GENERIC_NOUNS]
        fits = [(t, x) for t in P.TEMPLATES for x in nouns
                if t.format(sn.format(x)) == b.captions[2 * k]
                and t.format(sd.format(x)) == b.captions[2 * k + 1]]
        assert fits and sn in P.NORMAL_STATES and sd not in P.NORMAL_STATES
    again = P.make_batch(cfg, step=7)
    assert torch.equal(again.images, b.images) and again.captions == b.captions


def test_no_category_word_of_the_photo_domains_in_the_caption_vocabulary():
    from pfl.data.synthetic import DOMAINS

    vocab = P.caption_vocabulary()
    words = {w for d in ("aux", "target", "medical") for c in DOMAINS[d]
             for w in c.name.lower().replace("_", " ").split()}
    clash = {(v, w) for v in vocab for w in words if v == w or v.startswith(w) or
             w.startswith(v) and len(v) >= 4}
    assert not clash, clash
    # ... and the vocabulary is really all that captions hold (checked on drawn batches).
    cfg = P.PretrainConfig(batch=8, image_size=28, zoom=0.0)
    for step in range(3):
        for cap in P.make_batch(cfg, step).captions:
            assert set(cap.replace(".", " ").split()) <= vocab, cap


def test_pretraining_data_reads_no_file(monkeypatch):
    """No image of another domain can enter: drawing batches opens no file at all."""
    def refuse(*a, **k):
        raise AssertionError(f"pretraining data opened a file: {a}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(np, "load", refuse)
    P.make_batch(P.PretrainConfig(batch=4, image_size=28), step=0)


ROOT = Path(P.__file__).parents[2]


def _source(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _pfl_imports(module: str, seen: set[str]) -> set[str]:
    """Every module imported by ``module`` and, transitively, by the pfl modules it imports."""
    import ast

    if module in seen:
        return set()
    seen.add(module)
    found = set()
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    for name in sorted(found):
        if name.startswith("pfl"):
            mod = name if _source(name) else name.rsplit(".", 1)[0]
            if _source(mod):
                found |= _pfl_imports(mod, seen)
    return found


def test_pretrain_module_imports_nothing_of_the_photo_domains():
    """pfl.clip.pretrain and every pfl module below it import no photo source or dataset reader."""
    imports = _pfl_imports("pfl.clip.pretrain", set())
    assert {"pfl.data.patterns", "pfl.data.defects"} <= imports
    banned = ("pfl.data.synthetic", "pfl.data.dataset", "pfl.data.adapters", "skimage", "sklearn")
    assert not {m for m in imports if m.split(".")[0] in banned or
                any(m == b or m.startswith(b + ".") for b in banned)}


# --- the loop ---------------------------------------------------------------------------------
TINY = dict(steps=4, batch=2, image_size=28, final_size=42, final_steps=2, final_batch=1,
            warmup=2, checkpoint_every=1, zoom=0.5)


@pytest.mark.slow
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    cfg = P.PretrainConfig(**TINY)
    full = P.pretrain(cfg, tmp_path / "a", progress=False)
    P.pretrain(cfg, tmp_path / "b", stop_after=1, progress=False)
    P.pretrain(cfg, tmp_path / "b", stop_after=3, progress=False, workers=1)  # across phases
    resumed = P.pretrain(cfg, tmp_path / "b", progress=False)
    assert resumed == full
    assert P.sha256(tmp_path / "a/tiny_clip.safetensors") == \
        P.sha256(tmp_path / "b/tiny_clip.safetensors")
    with pytest.raises(ValueError, match="another config"):
        P.pretrain(P.PretrainConfig(**{**TINY, "lr": 0.5}), tmp_path / "a", progress=False)


# --- the shipped weights ----------------------------------------------------------------------
@shipped
@each_tower
def test_shipped_weights_match_their_record_and_load(tower):
    record, history_csv = tower_record(tower)
    assert P.sha256(TOWERS[tower]) == record["sha256"]
    clip = P.init_clip("pfl-tiny", 224, init_seed=1)
    load_weights(clip, TOWERS[tower])  # raises if the file does not fit the model
    history = P.read_history_csv(history_csv)
    assert len(history) == record["steps"] == record["config"]["steps"]
    assert [h["loss"] for h in history[:5]] == record["first_losses"]
    assert history[-1]["loss"] == record["final_loss"]


@shipped
def test_tower_v2_continues_v1_and_records_its_photographs():
    """v2's record pins its start (v1's weights) and its photo set; that the photos are apart
    from the benchmark's is tests/test_photos.py's job (by content hash)."""
    v1, _ = tower_record("tiny-v1")
    v2, _ = tower_record("tiny-v2")
    assert v2["init_weights_sha256"] == v1["sha256"] == P.sha256(TOWERS["tiny-v1"])
    assert v2["photos"]["package"]["name"] == PH.PACKAGE and v2["photos"]["used"] > 300
    # every photo the run left out is listed with its reason
    assert len(v2["photos"]["excluded_photos"]) == v2["photos"]["excluded"]
    with pytest.raises(KeyError, match="tiny-v1"):
        tower_record("tiny-v3")


@shipped
@each_tower
def test_record_command_parses_to_the_record_config(tower):
    from pfl.cli import build_parser

    record, _ = tower_record(tower)
    argv = shlex.split(record["command"])[3:]  # drop "python -m pfl"
    args = build_parser().parse_args(argv)
    changes = {k: (None if v == "none" else tuple(v) if isinstance(v, list) else v)
               for k, v in vars(args).items()
               if k in P.PretrainConfig.__dataclass_fields__ and v is not None}
    assert P.PretrainConfig(**changes) == P.PretrainConfig.from_dict(record["config"])


@shipped
@pytest.mark.slow
@each_tower
def test_record_first_losses_reproduce(tower, tmp_path, monkeypatch):
    """The record's config, replayed for 2 steps, gives the recorded losses.

    Note: exact float equality holds on the machine type that made the record (x86-64 CPU,
    torch's thread count from the record); other CPUs or BLAS builds may differ in the last
    digits, hence the 1e-6 tolerance, which a changed recipe would exceed by far. Tower v2 reads
    the photographs of a Debian package: where it is not installed (CI) the test skips, after
    checking that the record names the package to install.
    """
    record, _ = tower_record(tower)
    cfg = P.PretrainConfig.from_dict(record["config"])
    if cfg.photos:
        if not Path(cfg.photos).is_dir():
            assert record["photos"]["package"]["name"] == PH.PACKAGE
            pytest.skip(f"needs the photographs of `{PH.INSTALL}`")
        found = PH.find_photos(cfg.photos)
        assert found.digest() == record["photos"]["sha256"], \
            f"the photos under {cfg.photos} are not the ones tower {tower} was trained on"
    monkeypatch.chdir(config.repo_root())  # the record's --init-weights path is repo-relative
    # Under a float64 default too (what pfl.setup() gives the smoke CLI): pretraining keeps
    # the record's float32, so `pfl pretrain` reproduces it.
    with default_dtype(torch.float64):
        history = P.pretrain(cfg, tmp_path, stop_after=2, progress=False)
        assert torch.get_default_dtype() == torch.float64
    got = [h["loss"] for h in history]
    assert got == pytest.approx(record["first_losses"][:2], abs=1e-6)


def test_pattern_store_is_balanced_deterministic_and_apart_from_training(tiny_backbone):
    a = pattern_store(tiny_backbone, pairs=5, batch=2)
    assert len(a) == 10 and a.classes == ["patterns"]
    assert a.labels.tolist() == [0, 1] * 5  # flawless, defective, pair by pair
    assert a.masks[0::2].sum() == 0 and (a.masks[1::2].flatten(1).sum(1) > 0).all()
    assert a.masks.shape[-1] == tiny_backbone.image_size
    b = pattern_store(tiny_backbone, pairs=5, batch=2)
    assert torch.equal(a.feats.global_, b.feats.global_)
    other = pattern_store(tiny_backbone, pairs=5, batch=2, seed=0)  # the training stream
    assert not torch.equal(a.feats.global_, other.feats.global_)


def test_init_weights_continue_from_the_shipped_tower(tmp_path):
    shipped = ASSETS / "tiny_clip.safetensors"
    cfg = P.PretrainConfig(steps=2, batch=2, image_size=56, final_size=None, warmup=1,
                           checkpoint_every=1, init_weights=str(shipped))
    model = P.Pretrainer(cfg)
    reference = P.init_clip(cfg.model_name, 56)
    load_weights(reference, shipped)
    for (name, a), b in zip(model.clip.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name  # the shipped tower, its temperature included
    assert not torch.equal(P.Pretrainer(P.PretrainConfig(image_size=56)).clip.logit_scale,
                           model.clip.logit_scale)
    P.pretrain(cfg, tmp_path, progress=False)
    record = json.loads((tmp_path / "tiny_clip.json").read_text())
    assert record["init_weights_sha256"] == P.sha256(shipped)
    assert "--init-weights" in record["command"]
    with pytest.raises(FileNotFoundError, match=r"no such file.*tiny_clip\w*\.safetensors"):
        P.pretrain(dataclasses.replace(cfg, init_weights=str(tmp_path / "x.safetensors")),
                   tmp_path / "b", progress=False)
