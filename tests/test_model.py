"""BayesPFL: shapes, exactness of the map pipeline, batch independence, one text call, training."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pfl.config import ModelConfig, TrainConfig
from pfl.method.contract import Batch, Method
from pfl.method.maps import sample_std_reference
from pfl.method.model import RCA, BayesPFL
from pfl.method.sampling import PromptNoise, draw_noise

CFG = ModelConfig(n_prompts=3, n_ctx=5, n_state=5, flow_length=4, mc_train=1, mc_test=3)
NAMES = ["bottle", "pcb1", "metal_nut", "bottle"]


@pytest.fixture(scope="module")
def images(tiny_backbone):
    S = tiny_backbone.image_size
    return torch.randn(4, 3, S, S, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model(tiny_backbone):
    return BayesPFL(tiny_backbone, CFG, seed=0).eval()


def _forward(model, images, names, **kw):
    with torch.no_grad():
        return model(images, names, **kw)


def test_eval_shapes_and_ranges(model, images):
    bb = model.backbone
    out = _forward(model, images, NAMES, seeds=[0, 1, 2, 3])
    N, L, S, (gh, gw) = 4, len(bb.layers), bb.image_size, bb.grid
    M = CFG.n_prompts * CFG.mc_test
    assert out.anomaly_map.shape == (N, S, S)
    assert out.layer_maps.shape == (N, L, S, S)
    assert out.pixel_logits.shape == (N, L, M, gh, gw)
    assert out.global_logits.shape == (N, M, 2)
    assert out.score.shape == (N,)
    assert out.text_features.shape == (N, CFG.n_prompts, CFG.mc_test, 2, bb.embed_dim)
    assert out.banks.tolist() == [0, 1, 2] and out.n_samples == CFG.mc_test
    assert set(out.flow_losses) == {"isd", "normal", "abnormal"}
    assert bool(((out.anomaly_map > 0) & (out.anomaly_map < 1)).all())
    torch.testing.assert_close(out.anomaly_map, out.layer_maps.mean(1))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(N, 3, 3, 2))


def test_rca_against_loop():
    g = torch.Generator().manual_seed(0)
    E, H, N, L, T, M = 16, 4, 2, 3, 7, 5
    rca = RCA(E, H)
    text = F.normalize(torch.randn(N, M, E, generator=g), dim=-1)
    patches = F.normalize(torch.randn(N, L, T, E, generator=g), dim=-1)
    out = rca(text, patches)
    q = rca.query(text)
    dh = E // H
    ref = torch.empty(N, L, M, E)
    for n in range(N):
        for layer in range(L):
            heads = []
            for h in range(H):
                qh, kh = q[n, :, h * dh:(h + 1) * dh], patches[n, layer, :, h * dh:(h + 1) * dh]
                att = torch.softmax(qh @ kh.T / E ** 0.5, dim=-1)  # scale of the joint width
                heads.append(att @ kh)
            ref[n, layer] = F.normalize(torch.cat(heads, -1) + text[n], dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_maps_and_score_equal_a_brute_force_pipeline(model, images):
    # Pair logits for the normal and the abnormal prompt, each upsampled on its own, softmax
    # over the pair: the model upsamples only the difference. Exact to float rounding.
    captured = {}
    handle = model.rca.register_forward_hook(lambda m, a, o: captured.update(refined=o))
    try:
        out = _forward(model, images[:2], NAMES[:2], seeds=[5, 6])
    finally:
        handle.remove()
    bb = model.backbone
    with torch.no_grad():
        feats = bb.encode_image(images[:2])
        fs = F.normalize(torch.einsum("nltw,lew->nlte", feats.patches, model.proj.weight), dim=-1)
        logits = model.tau_pix.exp() * torch.einsum("nlte,nlke->nlkt", fs, captured["refined"])
        n, L, K, _ = logits.shape
        up = F.interpolate(logits.reshape(n, L * K, *bb.grid), size=(bb.image_size,) * 2,
                           mode="bilinear", align_corners=False)
        up = up.view(n, L, K // 2, 2, bb.image_size, bb.image_size)
        prob = torch.softmax(up, dim=3)[:, :, :, 1]
        torch.testing.assert_close(out.layer_maps, prob.mean(2), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.anomaly_map, prob.mean((1, 2)), atol=1e-6, rtol=0)
        # global score: pairs of (phi(t_n), phi(t_a)) against g, softmax, mean over pairs
        t = out.text_features.reshape(n, -1, 2, bb.embed_dim)
        lg = model.tau_img.exp() * (F.normalize(model.phi(t), dim=-1)
                                    @ F.normalize(feats.global_, dim=-1)[:, None, :, None])
        score = torch.softmax(lg.squeeze(-1), -1)[..., 1].mean(1)
        torch.testing.assert_close(out.score, score, atol=1e-6, rtol=0)


def test_map_std_equals_a_per_sample_loop(model, images):
    # Sample r's map is the mean over layers and banks of its pairs b R + r; map_std is their
    # spread over r. Also: the mean of the per-sample maps is the anomaly map, and asking
    # for the spread changes nothing else.
    out = _forward(model, images[:2], NAMES[:2], seeds=[5, 6], map_std=True)
    plain = _forward(model, images[:2], NAMES[:2], seeds=[5, 6])
    assert plain.map_std is None and torch.equal(out.anomaly_map, plain.anomaly_map)
    S, R = model.backbone.image_size, CFG.mc_test
    ref = sample_std_reference(out.pixel_logits, (S, S), R)
    torch.testing.assert_close(out.map_std, ref, atol=1e-6, rtol=0)
    assert float(out.map_std.max()) > 1e-4  # the flow draws do disagree somewhere
    pred = model.predict(Batch(NAMES[:2], images=images[:2]), torch.Generator().manual_seed(0),
                         map_std=True)
    assert pred.map_std.shape == pred.maps.shape


def test_half_precision_predict_is_close_and_checked(model, images):
    batch = Batch(list(NAMES), feats=model.backbone.encode_image(images))
    full = model.predict(batch, torch.Generator().manual_seed(0))
    half = model.predict(batch, torch.Generator().manual_seed(0), precision="bf16")
    assert half.maps.dtype == full.maps.dtype
    # bf16 keeps 8 mantissa bits: maps and scores move by ~1e-3 (the benchmark: 1.5e-3 max).
    assert float((half.maps - full.maps).abs().max()) < 1e-2
    assert float((half.scores - full.scores).abs().max()) < 1e-2
    with pytest.raises(ValueError, match="bf16"):
        model.predict(batch, torch.Generator(), precision="half")


def test_batch_independence(model, images):
    # The same image alone and inside a batch of 4 (other classes, so longer prompts in the
    # same text call), with the same seed for its draws: the same map and score.
    alone = _forward(model, images[2:3], ["bottle"], seeds=[123])
    batch = _forward(model, images[[0, 2, 1, 3]], ["pcb1", "bottle", "metal_nut", "bottle"],
                     seeds=[7, 123, 8, 9])
    torch.testing.assert_close(batch.anomaly_map[1], alone.anomaly_map[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.score[1], alone.score[0], atol=1e-5, rtol=0)
    # and the draws really differ between images: the same image with another seed moves
    other = _forward(model, images[2:3], ["bottle"], seeds=[124])
    assert (other.anomaly_map - alone.anomaly_map).abs().max() > 1e-5


def test_one_text_call_for_all_prompts(model, images, monkeypatch):
    # One shared-prefix call: a group per (image, bank, sample), its normal and abnormal prompt.
    calls = []
    real = model.backbone.encode_text_shared_prefix

    def counting(prefix, suffix, eot):
        calls.append(tuple(suffix.shape[:2]))
        return real(prefix, suffix, eot)

    monkeypatch.setattr(model.backbone, "encode_text_shared_prefix", counting)
    _forward(model, images, NAMES, seeds=[0, 1, 2, 3])
    assert calls == [(4 * CFG.n_prompts * CFG.mc_test, 2)]
    calls.clear()
    model.train()
    try:
        _forward(model, images[:2], NAMES[:2], seeds=[0, 1], bank_index=1)
    finally:
        model.eval()
    assert calls == [(2 * CFG.n_prompts * CFG.mc_train, 2)]  # every bank for L_ort


def test_shared_prefix_text_path_equals_the_plain_one(model):
    # The prompts of encode_prompts through the plain text path, one full sequence each.
    g = torch.randn(2, model.backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    blk = draw_noise([1, 2], (3, CFG.mc_test, model.backbone.text_width)).permute(1, 2, 0, 3)
    noise = PromptNoise(isd=blk[0], iad=blk[1:], seeds=[1, 2], base=1)
    with torch.no_grad():
        isd, iad, _ = model.sample_prompts(g, noise)
        ids, eot = model.skeleton(["pcb1", "bottle"])
        seq = model.bank.sequences(model.backbone.token_embedding(ids), isd, iad)
        n, b, r = seq.shape[:3]
        plain = model.backbone.encode_text_embeddings(seq.flatten(0, 3),
                                                      eot.repeat_interleave(b * r * 2))
        shared = model.encode_prompts(["pcb1", "bottle"], isd, iad)
    torch.testing.assert_close(shared, plain.view(n, b, r, 2, -1), atol=1e-6, rtol=0)


def test_determinism_for_a_generator_seed(model, images):
    a = _forward(model, images[:2], NAMES[:2], generator=torch.Generator().manual_seed(3))
    b = _forward(model, images[:2], NAMES[:2], generator=torch.Generator().manual_seed(3))
    c = _forward(model, images[:2], NAMES[:2], generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.score, b.score)
    assert not torch.equal(a.anomaly_map, c.anomaly_map)


def _capture_iad(model):
    zs = []
    handle = model.iad_normal.register_forward_hook(lambda m, a, o: zs.append(o.z))
    return zs, handle


def test_share_iad_samples(model, images):
    # The shared IAD noise is that of the run's seed (here 0, also image 0's seed); a call
    # without that seed (seed defaults to its first image's) draws anew. No state is kept.
    zs, handle = _capture_iad(model)
    try:
        _forward(model, images[:2], NAMES[:2], seeds=[0, 1])
        _forward(model, images[:2], NAMES[:2], seeds=[0, 1], seed=0, share_iad=True)
        _forward(model, images[2:], NAMES[2:], seeds=[2, 3], seed=0, share_iad=True)
        _forward(model, images[2:], NAMES[2:], seeds=[2, 3], share_iad=True)
    finally:
        handle.remove()
    per_image, shared1, shared2, redrawn = zs
    R, D = CFG.mc_test, model.backbone.text_width
    assert per_image.shape == (R, 2, D) and not torch.allclose(per_image[:, 0], per_image[:, 1])
    assert shared1.shape == (R, 1, D)
    # drawn once, at the first image (from its stream), reused for the later images
    torch.testing.assert_close(shared1[:, 0], per_image[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(shared2, shared1, atol=0, rtol=0)
    # after a reset the next image draws anew (here from its own seed)
    assert redrawn.shape == (R, 1, D) and not torch.allclose(redrawn, shared1)


def test_training_mode_uses_one_bank_and_matches_inference(tiny_backbone, images):
    model = BayesPFL(tiny_backbone, CFG, seed=1)
    model.train()
    train = _forward(model, images[:2], NAMES[:2], seeds=[4, 5], bank_index=2)
    assert train.banks.tolist() == [2] and train.n_samples == 1
    assert train.pixel_logits.shape[2] == 1 and train.global_logits.shape == (2, 1, 2)
    assert train.text_features.shape[1:3] == (CFG.n_prompts, 1)
    model.eval()
    infer = _forward(model, images[:2], NAMES[:2], seeds=[4, 5], n_samples=1)
    torch.testing.assert_close(train.pixel_logits[:, :, 0], infer.pixel_logits[:, :, 2],
                               atol=1e-5, rtol=0)
    # without bank_index the bank comes from the generator
    model.train()
    feats = model.backbone.encode_image(images[:1])
    with torch.no_grad():
        drawn = {int(model.forward_features(feats, NAMES[:1], seeds=[0],
                                            generator=torch.Generator().manual_seed(s)).banks)
                 for s in range(10)}
    assert drawn == {0, 1, 2}


def test_training_draws_are_reproducible_for_a_generator_seed(tiny_backbone, images):
    model = BayesPFL(tiny_backbone, CFG, seed=0).train()
    x, masks, labels = _batch(tiny_backbone, images)
    batch = Batch(list(NAMES), feats=tiny_backbone.encode_image(x), masks=masks, labels=labels)
    gen = torch.Generator().manual_seed(2)
    a = [model.training_step(batch, gen).terms["total"] for _ in range(3)]
    gen = torch.Generator().manual_seed(2)
    b = [model.training_step(batch, gen).terms["total"] for _ in range(3)]
    assert a == b
    assert len(set(a)) > 1  # every step draws anew (bank index and noise)


def test_several_training_samples_average_in_the_loss(tiny_backbone, images):
    model = BayesPFL(tiny_backbone, dataclasses.replace(CFG, mc_train=2), seed=0).train()
    out = _forward(model, images[:2], NAMES[:2], seeds=[0, 1], bank_index=0)
    probs = model.pixel_probs(out)
    L, S = len(tiny_backbone.layers), tiny_backbone.image_size
    assert probs.shape == (L, 2 * 2, S, S)
    torch.testing.assert_close(probs.view(L, 2, 2, S, S).mean(1), out.layer_maps.transpose(0, 1),
                               atol=1e-6, rtol=0)


def _batch(tiny_backbone, images):
    S = tiny_backbone.image_size
    masks = torch.zeros(4, S, S)
    masks[1, 20:60, 30:70] = 1
    masks[3, 60:90, 10:50] = 1
    return images, masks, torch.tensor([0, 1, 0, 1])


def test_only_new_modules_get_gradients(tiny_backbone, images):
    model = BayesPFL(tiny_backbone, CFG, seed=0).train()
    x, masks, labels = _batch(tiny_backbone, images)
    out = model(x, NAMES, seeds=[0, 1, 2, 3], bank_index=0)
    model.loss(out, masks, labels, TrainConfig()).total.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    new = model.trainable_parameters()
    assert len(new) == len(list(model.parameters())) - len(list(model.backbone.parameters()))
    missing = [n for n, p in model.named_parameters()
               if not n.startswith("backbone.") and (p.grad is None or not p.grad.isfinite().all())]
    assert missing == []
    groups = model.parameter_groups()
    assert sorted(map(id, sum(groups.values(), []))) == sorted(map(id, new))
    assert len(groups["prompts"]) == 3 and len(groups["temperatures"]) == 2


def test_one_adam_step_lowers_the_loss(tiny_backbone, images):
    model = BayesPFL(tiny_backbone, CFG, seed=0).train()
    x, masks, labels = _batch(tiny_backbone, images)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)

    def total():
        out = model(x, NAMES, seeds=[0, 1, 2, 3], bank_index=1)
        return model.loss(out, masks, labels, TrainConfig())

    before = total()
    before.total.backward()
    opt.step()
    with torch.no_grad():
        after = total().as_dict()
    before = before.as_dict()
    assert after["total"] < before["total"]
    assert before["flow_isd"] != 0 and before["ort"] > 0


def test_trainable_state_roundtrip(tiny_backbone, images, model):
    state = model.trainable_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    other = BayesPFL(tiny_backbone, CFG, seed=9).eval()
    before = _forward(other, images[:1], NAMES[:1], seeds=[0])
    other.load_trainable_state_dict(state)
    mine = _forward(model, images[:1], NAMES[:1], seeds=[0])
    theirs = _forward(other, images[:1], NAMES[:1], seeds=[0])
    assert torch.equal(mine.anomaly_map, theirs.anomaly_map)
    assert not torch.equal(before.anomaly_map, theirs.anomaly_map)
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != "tau_pix"})


def test_bad_input_is_named(model, images):
    with pytest.raises(ValueError, match="class names"):
        _forward(model, images[:2], NAMES[:1], seeds=[0, 1])
    with pytest.raises(ValueError, match="seeds"):
        _forward(model, images[:2], NAMES[:2], seeds=[0])
    with pytest.raises(ValueError, match="bank_index"):
        _forward(model, images[:1], NAMES[:1], seeds=[0], bank_index=3)
    with pytest.raises(ValueError, match="'compiled', 'fused'"):
        _forward(model, images[:1], NAMES[:1], seeds=[0], map_kernel="triton")


def test_method_contract(tiny_backbone, images):
    model = BayesPFL(tiny_backbone, CFG, seed=0)
    assert isinstance(model, Method)
    x, masks, labels = _batch(tiny_backbone, images)
    feats = tiny_backbone.encode_image(x)
    model.train()
    step = model.training_step(Batch(list(NAMES), feats=feats, masks=masks, labels=labels),
                               torch.Generator().manual_seed(0))
    assert step.total.requires_grad and set(step.terms) >= {"total", "cls", "ort", "flow_isd"}
    model.eval()
    # one generator over the data: each image's draws do not depend on the batch size
    whole = model.predict(Batch(list(NAMES), feats=feats), torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    halves = [model.predict(Batch(NAMES[i:i + 2], feats=feats.select(slice(i, i + 2))), gen)
              for i in (0, 2)]
    assert whole.maps.shape == masks.shape and whole.scores.shape == (4,)
    torch.testing.assert_close(torch.cat([h.maps for h in halves]), whole.maps, atol=1e-5, rtol=0)


def test_predict_n_samples_sets_r_for_the_call_only(model, images):
    # R = 2 through predict is the same as asking forward for n_samples=2 with the run seed;
    # the config is never touched.
    feats = model.backbone.encode_image(images)
    want = _forward(model, images, NAMES, seed=7, n_samples=2)
    got = model.predict(Batch(list(NAMES), feats=feats), torch.Generator().manual_seed(7),
                        n_samples=2)
    torch.testing.assert_close(got.maps, want.anomaly_map, atol=0, rtol=0)
    assert model.cfg.mc_test == CFG.mc_test
    default = model.predict(Batch(list(NAMES), feats=feats), torch.Generator().manual_seed(7))
    assert not torch.equal(default.maps, got.maps)
    with pytest.raises(ValueError, match="R must be >= 1"):
        model.predict(Batch(list(NAMES), feats=feats), torch.Generator(), n_samples=0)


def test_scores_depend_on_the_image_not_its_position(model, images):
    # Issue #19: the same image alone, second, or fourth in a batch, in any order and batch
    # size, gets the same map and score (its noise comes from the seed and its pixels).
    feats = model.backbone.encode_image(images)
    assert feats.image_keys is not None and len(set(feats.image_keys.tolist())) == 4
    gen = torch.Generator().manual_seed(3)
    whole = model.predict(Batch(list(NAMES), feats=feats), gen)
    perm = [2, 0, 3, 1]
    shuffled = model.predict(Batch([NAMES[i] for i in perm], feats=feats.select(perm)), gen)
    torch.testing.assert_close(shuffled.maps, whole.maps[perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(shuffled.scores, whole.scores[perm], atol=1e-6, rtol=0)
    for i in range(4):  # alone, from the pixels (keys recomputed by the tower)
        alone = _forward(model, images[i:i + 1], NAMES[i:i + 1], seed=3)
        torch.testing.assert_close(alone.anomaly_map[0], whole.maps[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.score[0], whole.scores[i], atol=1e-5, rtol=0)
    pairs = [model.predict(Batch(NAMES[i:i + 2], feats=feats.select(slice(i, i + 2))), gen)
             for i in (0, 2)]
    torch.testing.assert_close(torch.cat([p.scores for p in pairs]), whole.scores,
                               atol=1e-6, rtol=0)
    # the same pixels under another class name or in another slot: same noise, so a copy of
    # image 0 scores exactly as image 0 does
    dup = torch.stack([images[1], images[0], images[0]])
    out = _forward(model, dup, [NAMES[1], NAMES[0], NAMES[0]], seed=3)
    torch.testing.assert_close(out.score[1], out.score[2], atol=0, rtol=0)
    # and the seed matters: another run seed moves the scores
    other = model.predict(Batch(list(NAMES), feats=feats), torch.Generator().manual_seed(4))
    assert (other.scores - whole.scores).abs().max() > 1e-6


def test_flow_type_changes_only_the_flow_tensors(tiny_backbone):
    # Every module draws its init from its own (seed, name) stream: a Gaussian model shares
    # every tensor that is not a planar step with the flow model, bit for bit.
    flow = BayesPFL(tiny_backbone, CFG, seed=0).trainable_state_dict()
    gauss = BayesPFL(tiny_backbone, dataclasses.replace(CFG, flow_type="gaussian"),
                     seed=0).trainable_state_dict()
    shared = sorted(set(flow) & set(gauss))
    only_flow = sorted(set(flow) - set(gauss))
    assert only_flow and all(k.split(".")[1] in {"u_head", "w_head", "b_head"}
                             for k in only_flow)
    assert any(k.startswith("iad_encoder.") for k in shared)
    for k in shared:
        if gauss[k].numel() or flow[k].numel():
            assert torch.equal(flow[k], gauss[k]) or k.split(".")[-1] in {"u", "w", "b"}, k
    # the planar parameters of the free flows have K rows against 0: the rest is identical
    assert [k for k in shared if not torch.equal(flow[k], gauss[k])] == [
        k for k in shared if k.split(".")[-1] in {"u", "w", "b"} and flow[k].shape[0] > 0]
    # building the model leaves the caller's global RNG alone
    state = torch.get_rng_state()
    BayesPFL(tiny_backbone, CFG, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_checkpoint_holds_the_shared_encoder_once_and_old_layouts_load(tiny_backbone, model,
                                                                      images):
    state = model.trainable_state_dict()
    assert not any(".encoder." in k and k.startswith(("iad_normal.", "iad_abnormal."))
                   for k in state)
    ptrs = [v.data_ptr() for v in state.values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))  # each tensor once
    # the older layout repeated the IAD encoder under both IAD flows
    enc = {k: v for k, v in state.items() if k.startswith("iad_encoder.")}
    old = dict(state) | {f"iad_{s}.encoder.{k[len('iad_encoder.'):]}": v.clone()
                         for s in ("normal", "abnormal") for k, v in enc.items()}
    other = BayesPFL(tiny_backbone, CFG, seed=5).eval()
    other.load_trainable_state_dict(old)
    mine = _forward(model, images[:1], NAMES[:1], seeds=[0])
    theirs = _forward(other, images[:1], NAMES[:1], seeds=[0])
    assert torch.equal(mine.anomaly_map, theirs.anomaly_map)
    bad = dict(old)
    key = next(k for k in bad if k.startswith("iad_normal.encoder."))
    bad[key] = bad[key] + 1
    with pytest.raises(ValueError, match="shares"):
        other.load_trainable_state_dict(bad)
