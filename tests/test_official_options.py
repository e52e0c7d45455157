"""The options that reproduce the authors' code, on small inputs (the golden-fixture match is in
tests/test_official.py): preset, init, IAD log-det / N, second stage, test-set score, early
stopping, the CLI's refusal of a bad checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _toy import ToyMethod, toy_store

from pfl import config
from pfl.cli import main
from pfl.config import ModelConfig, TrainConfig
from pfl.method.contract import Batch
from pfl.method.flows import PromptFlow
from pfl.method.model import BayesPFL
from pfl.run.evaluate import official_scores, official_topk
from pfl.run.train import fit, official_selection_classes

CFG = ModelConfig(n_prompts=3, n_ctx=2, n_state=2, flow_length=3, mc_train=1, mc_test=2)


def test_preset_switches_every_option_on_and_paper_stays_default():
    p, o = config.paper(), config.official()
    assert (o.model.official_compat, o.model.share_iad_samples, o.model.init,
            o.model.iad_logdet_per_batch, o.model.second_stage) == (True, True, "official",
                                                                    True, True)
    assert (o.train.loss_form, o.train.optimizer, o.train.selection, o.train.patience,
            o.eval.image_score) == ("official", "official", "official_target", 3, "official")
    assert (p.model.init, p.train.loss_form, p.eval.image_score, p.model.second_stage) == (
        "pfl", "paper", "per_image", False)
    assert config.active("official").name == "paper-official"
    assert config.Profile.from_dict(o.to_dict()) == o


def test_official_init(tiny_backbone):
    m = BayesPFL(tiny_backbone, dataclasses.replace(CFG, init="official", second_stage=True,
                                                    official_compat=True),
                 seed=1)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.startswith(("backbone", "rca")):
            assert float(mod.weight.detach().std()) == pytest.approx(0.02, rel=0.2), name
            assert float(mod.bias.detach().abs().max()) == 0.0, name
    free = torch.cat([m.iad_normal.u.flatten(), m.iad_normal.w.flatten(),
                      m.iad_state.flatten()]).detach()
    assert float(free.std()) == pytest.approx(1.0, rel=0.1)
    bound = 1 / m.rca.query.weight.shape[1] ** 0.5  # torch's default Linear/Conv1d init
    assert float(m.rca.query.weight.abs().max()) <= bound
    assert float(m.rca.query.weight.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    # q0 std starts near exp(0 / 4) = 1 (pfl's init: 0.02)
    with torch.no_grad():
        _, sigma = m.iad_encoder(m.iad_state)
    assert float(sigma.mean()) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="init"):
        BayesPFL(tiny_backbone, dataclasses.replace(CFG, init="code"))


def test_iad_logdet_scale_changes_only_the_loss():
    g = torch.Generator().manual_seed(0)
    flow = PromptFlow(dim=6, cond_dim=4, n_steps=3, amortised=False)
    with torch.no_grad():
        flow.u.normal_(generator=g)
    xi, eps = torch.randn(1, 4, generator=g), torch.randn(5, 1, 6, generator=g)
    a, b = flow(xi, 5, eps=eps), flow(xi, 5, eps=eps, log_det_scale=0.25)
    assert torch.equal(a.z, b.z) and torch.equal(a.log_q, b.log_q)
    z0, log_q0 = flow.encoder.sample(xi, 5, eps=eps)
    log_det = log_q0 - a.log_q
    torch.testing.assert_close(b.loss - a.loss, (0.75 * log_det).mean(0))


def test_second_stage_changes_scores_not_maps_and_trains_on_ce(tiny_backbone):
    m = BayesPFL(tiny_backbone, dataclasses.replace(CFG, second_stage=True), seed=0).eval()
    S = tiny_backbone.image_size
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = m(x, ["bottle", "pcb1"], seeds=[0, 1])
        params = m.begin_second_stage()
        two = m(x, ["bottle", "pcb1"], seeds=[0, 1])
    assert torch.equal(one.anomaly_map, two.anomaly_map)
    assert not torch.allclose(one.score, two.score)
    assert {id(p) for p in params} == {id(p) for p in [*m.phi.parameters(),
                                                       *m.global_head.parameters()]}
    assert int(m.trainable_state_dict()["image_stage"]) == 2
    m.train()
    batch = Batch(["bottle", "pcb1"], images=x, masks=torch.zeros(2, S, S),
                  labels=torch.tensor([0, 1]))
    step = m.training_step(batch, torch.Generator().manual_seed(0))
    assert float(step.total) == pytest.approx(step.terms["cls"]) != step.terms["total"]
    m.eval()
    # the patch attention pooling against a loop
    feats = tiny_backbone.encode_image(x)
    fuse = m.global_head.fuse
    with torch.no_grad():
        for n in range(2):
            tokens = torch.cat(list(feats.patches[n]), dim=-1)
            h = fuse.fuse_modules(tokens)
            a = torch.softmax(fuse.compress(h)[:, 0], 0)
            ref = fuse.post_process((a[:, None] * h).sum(0))
            torch.testing.assert_close(fuse(feats.patches[n:n + 1])[0], ref)


def test_official_image_score_recipe():
    assert official_topk("screw") == 20 and official_topk("bottle") == 2000
    scores, local = np.array([0.1, 0.3, 0.2, 5.0]), np.array([2.0, 0.0, 1.0, 1.0])
    out = official_scores(scores, local, ["a", "a", "a", "b"])
    mm_s, mm_l = np.array([0, 1, 0.5]), np.array([1, 0, 0.5])
    np.testing.assert_allclose(out[:3], 0.5 * mm_s + 0.5 * mm_l, atol=1e-7)
    assert out[3] == 0.0
    only = official_scores(scores, local, ["a", "a", "a", "b"], image_only=True)
    np.testing.assert_allclose(only[:3], mm_s, atol=1e-7)


def test_selection_classes_and_patience(tmp_path):
    mvtec = ["bottle", "cable", "hazelnut", "leather", "screw", "wood", "zipper"]
    assert official_selection_classes(mvtec) == ["bottle", "hazelnut", "wood", "zipper",
                                                 "leather"]
    assert official_selection_classes(["e", "d", "c", "b", "a", "f"]) == list("abcde")
    aux = toy_store(["a", "b", "c", "d"], n_per_class=6, seed=0)
    cfg = TrainConfig(epochs=8, batch_size=4, lr=0.0, seed=3, selection="holdout",
                      holdout_classes=1, patience=2)
    h = fit(ToyMethod(), aux, cfg, tmp_path / "run")
    # lr 0: nothing improves after epoch 1, so training stops after epoch 1 + patience
    assert h.best_epoch == 1 and len(h.epochs) == 3


def test_cli_import_official_names_missing_keys(tmp_path, capsys):
    torch.save({"MyModel": {"prompt_context": torch.zeros(3, 5, 768)}}, tmp_path / "c.pth")
    assert main(["import-official", str(tmp_path / "c.pth"), "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "temperature_pixel" in err
    assert main(["import-official", str(tmp_path / "none.pth"), "--out", "x"]) == 2


class _TwoStageToy(ToyMethod):
    """A toy method with the second-stage hook: only ``glob`` trains in the second stage."""

    stage = 1

    def begin_second_stage(self):
        self.stage = 2
        return [self.glob]


def test_fit_runs_the_second_stage_on_its_parameters_only(tmp_path):
    aux = toy_store(["a", "b", "c"], n_per_class=4, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.05, seed=3, second_stage_epochs=2)
    first = ToyMethod()
    fit(first, aux, dataclasses.replace(cfg, second_stage_epochs=0), tmp_path / "one")
    m = _TwoStageToy()
    h = fit(m, aux, cfg, tmp_path / "two")
    assert m.stage == 2
    stage2 = [r for r in h.steps if r.get("stage") == 2]
    assert len(stage2) == 2 * 3 and {r["epoch"] for r in stage2} == {2, 3}
    # the first stage is the same run; the second moved glob alone
    assert torch.equal(m.heads, first.heads) and torch.equal(m.bias, first.bias)
    assert not torch.equal(m.glob, first.glob)


def test_preprocessing_equals_the_authors_on_the_fixture_images():
    """pfl's image and mask preprocessing gives the golden fixture's inputs (their transform)."""
    from pathlib import Path

    from PIL import Image
    from safetensors.torch import load_file

    from pfl.data.preprocess import image_to_tensor, mask_to_tensor

    fix = Path(__file__).parent / "fixtures" / "official-bayes-pfl"
    inputs = load_file(str(fix / "inputs.safetensors"))
    for i, name in enumerate(["0_bottle", "1_pcb1"]):
        image = image_to_tensor(Image.open(fix / f"image_{name}.png"), 336)
        torch.testing.assert_close(image, inputs["images"][i], rtol=0, atol=1e-6)
        mask = mask_to_tensor(Image.open(fix / f"mask_{name}.png"), 336)
        assert torch.equal(mask, inputs["masks"][i])
