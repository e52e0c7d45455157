"""pfl.run.features: cached frozen-tower features equal a direct encode; the disk cache is keyed by
weights and data; batches cover every sample once; fp16 storage leaves metrics unchanged."""

import copy

import numpy as np
import pytest
import torch
from _toy import ToyMethod, toy_store

from pfl.config import EvalConfig
from pfl.method.contract import Prediction
from pfl.run.features import FeatureStore, cache_key, clear_memory_cache, extract
from pfl.utils import kernel_dispatch

S = 112  # the tiny_backbone fixture's input size


class FakeDataset:
    """Six random images in two categories; the interface of pfl.data.dataset.AnomalyDataset."""

    def __init__(self, n=6, seed=0, root="/fake"):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, S, S, generator=g)
        self.masks = torch.zeros(n, S, S)
        self.masks[1::2, 20:40, 30:50] = 1
        self.root, self.split, self.seed = root, "test", seed
        self.samples = [{"img_path": f"{i}.png", "seed": seed} for i in range(n)]
        self.reads = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads += 1
        return {"image": self.images[i], "mask": self.masks[i], "label": i % 2,
                "cls_name": "ab"[i // 3], "path": f"{self.root}/{i}.png", "has_mask": True}


def test_store_equals_direct_encoding(tiny_backbone):
    ds = FakeDataset()
    store = extract(tiny_backbone, ds, cache="none", batch_size=4, storage_dtype=torch.float32)
    # The same batches as the store (a matmul's rounding may depend on the batch size).
    parts = [tiny_backbone.encode_image(x) for x in ds.images.split(4)]
    assert torch.equal(store.feats.patches, torch.cat([p.patches for p in parts]))
    assert torch.equal(store.feats.global_, torch.cat([p.global_ for p in parts]))
    ref = tiny_backbone.encode_image(ds.images)
    assert store.masks.dtype == torch.uint8 and torch.equal(store.masks.float(), ds.masks)
    assert store.labels.tolist() == [0, 1, 0, 1, 0, 1] and store.classes == ["a", "b"]
    half = extract(tiny_backbone, ds, cache="none", storage_dtype=torch.float16)
    torch.testing.assert_close(half.feats.patches.float(), ref.patches, rtol=1e-3, atol=1e-3)


def test_disk_cache_hit_and_keys(tiny_backbone, tmp_path):
    clear_memory_cache()
    ds = FakeDataset()
    first = extract(tiny_backbone, ds, cache="disk", cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    clear_memory_cache()
    ds2 = FakeDataset()
    again = extract(tiny_backbone, ds2, cache="disk", cache_dir=tmp_path)
    assert ds2.reads == 0  # served from disk: no image read
    assert torch.equal(again.feats.patches, first.feats.patches)
    assert torch.equal(again.masks, first.masks) and again.paths == first.paths
    # The key changes with the data and with the tower's weights, not with the object.
    k = cache_key(tiny_backbone, ds, torch.float16)
    assert cache_key(tiny_backbone, FakeDataset(), torch.float16) == k
    assert cache_key(tiny_backbone, FakeDataset(seed=1), torch.float16) != k
    assert cache_key(tiny_backbone, ds, torch.float32) != k
    same = copy.deepcopy(tiny_backbone)
    assert cache_key(same, ds, torch.float16) == k
    with torch.no_grad():
        same.clip.visual.conv1.weight[0, 0, 0, 0] += 1e-3
    assert cache_key(same, ds, torch.float16) != k
    # Memory cache: a second call in the process reads nothing either.
    clear_memory_cache()
    ds3 = FakeDataset()
    extract(tiny_backbone, ds3, cache="memory")
    extract(tiny_backbone, ds3, cache="memory")
    assert ds3.reads == len(ds3)


def test_cache_key_follows_the_cpu_kernels(tiny_backbone, monkeypatch):
    """Features computed under one kernel setting are not served under another (issue #14)."""
    ds = FakeDataset()
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    k = cache_key(tiny_backbone, ds, torch.float16)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
    assert cache_key(tiny_backbone, ds, torch.float16) != k
    assert kernel_dispatch()["capability"] == torch.backends.cpu.get_cpu_capability()


def test_batches_cover_every_sample_once_and_shuffle_is_seeded():
    store = toy_store(["a", "b", "c"], n_per_class=5)
    seen = [p for b in store.batches(4, shuffle=True, generator=torch.Generator().manual_seed(1))
            for p in b.paths]
    assert sorted(seen) == sorted(store.paths) and seen != store.paths
    again = [p for b in store.batches(4, shuffle=True, generator=torch.Generator().manual_seed(1))
             for p in b.paths]
    assert seen == again
    b = next(store.batches(3))
    assert b.feats.patches.dtype == torch.float32 and b.masks.dtype == torch.float32
    assert torch.equal(b.feats.patches, store.feats.patches[:3].float())
    sub = store.subset(classes=["a", "c"], per_class=1)
    assert sub.cls_names == ["a", "a", "c", "c"] and sub.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="not in this store"):
        store.subset(classes=["nope"])


def test_images_read_back_only_when_asked(tiny_backbone):
    ds = FakeDataset()
    store = extract(tiny_backbone, ds, cache="none")
    assert next(store.batches(2)).images is None
    b = next(store.batches(2, shuffle=True, generator=torch.Generator().manual_seed(0),
                           with_images=True))
    rows = [int(p.rsplit("/", 1)[1][0]) for p in b.paths]
    assert torch.equal(b.images, ds.images[rows])


def test_save_load_roundtrip(tmp_path):
    store = toy_store(["a", "b"], n_per_class=4)
    store.has_mask = False
    back = FeatureStore.load(store.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.feats.patches, store.feats.patches)
    assert back.cls_names == store.cls_names and back.has_mask is False


def test_fp16_storage_does_not_change_metrics():
    from pfl.run.evaluate import evaluate

    store = toy_store(["a", "b", "c"], n_per_class=8, seed=2)
    half = FeatureStore(
        type(store.feats)(store.feats.global_.half(), store.feats.patches.half()),
        store.masks, store.labels, store.cls_names, store.paths)
    m = ToyMethod()
    with torch.no_grad():
        m.heads.copy_(torch.ones_like(m.heads))  # a detector that works, so metrics move
    cfg = EvalConfig(batch_size=8, sigma=1.0)
    a = evaluate(m, store, cfg).table
    b = evaluate(m, half, cfg).table
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), atol=2e-3)
    assert a.loc["mean", "pixel_auroc"] > 0.8


def test_wrong_image_size_is_a_clear_error(tiny_backbone):
    ds = FakeDataset()
    ds.images = ds.images[..., :64, :64]
    with pytest.raises(ValueError, match="image_size=112"):
        extract(tiny_backbone, ds, cache="none")


def test_streaming_store_matches_cached_store_on_a_real_dataset(tiny_backbone, tmp_path):
    from pfl.data.dataset import AnomalyDataset
    from pfl.data.synthetic import SynthConfig, build_benchmark
    from pfl.run.evaluate import evaluate
    from pfl.run.features import StreamingStore

    root = build_benchmark(tmp_path / "b", SynthConfig(
        n_test_normal=2, n_test_anomalous=2, n_train_normal=0, n_train_anomalous=0,
        image_size=S, domains=("medical",), workers=1))["medical"]
    ds = AnomalyDataset(root, "test", image_size=S)
    cached = extract(tiny_backbone, ds, cache="none", storage_dtype=torch.float32)
    stream = StreamingStore(tiny_backbone, ds)
    assert stream.cls_names == cached.cls_names and stream.paths == cached.paths
    assert torch.equal(stream.labels, cached.labels) and stream.classes == cached.classes
    for a, b in zip(cached.batches(5), stream.batches(5)):
        assert torch.equal(a.feats.patches, b.feats.patches) and torch.equal(a.masks, b.masks)
    sub = stream.subset(classes=["cell"], per_class=1)
    assert sub.cls_names == ["cell", "cell"] and sub.labels.tolist() == [0, 1]

    class MapFromFeatures(ToyMethod):  # any deterministic function of the real features
        def predict(self, batch, generator):
            t = batch.feats.patches[:, -1].mean(-1)  # (N, T)
            g = int(t.shape[1] ** 0.5)
            maps = torch.nn.functional.interpolate(t.view(-1, 1, g, g), size=(S, S))[:, 0]
            return Prediction(maps=maps, scores=t.max(1).values)

    cfg = EvalConfig(batch_size=3)
    np.testing.assert_array_equal(evaluate(MapFromFeatures(), cached, cfg).table.to_numpy(float),
                                  evaluate(MapFromFeatures(), stream, cfg).table.to_numpy(float))


def test_a_per_class_subset_is_read_from_the_whole_split_once_it_is_cached(tiny_backbone,
                                                                          tmp_path, monkeypatch):
    """profile_store(per_class=k) takes its rows from the whole split's cached store (another
    notebook encoded it) instead of encoding them again: the same store in every field, the
    features bit for bit (each image's features do not depend on its batch neighbours)."""
    import shutil

    from pfl import config
    from pfl.data.synthetic import SynthConfig, build_benchmark
    from pfl.run import features

    build_benchmark(tmp_path / "data", SynthConfig(
        n_test_normal=3, n_test_anomalous=3, n_train_normal=0, n_train_anomalous=0,
        image_size=S, domains=("medical",), workers=1))
    profile = config.smoke().replace(data={"root": str(tmp_path / "data"), "synthetic": False,
                                           "feature_cache": "disk"})
    monkeypatch.setattr(features, "default_cache_dir", lambda: tmp_path / "cache")
    features.clear_memory_cache()
    alone = features.profile_store(profile, tiny_backbone, "medical", "test", per_class=2)
    shutil.rmtree(tmp_path / "cache")  # the subset's own cache file: not what is tested
    features.clear_memory_cache()
    whole = features.profile_store(profile, tiny_backbone, "medical", "test")
    assert len(alone) < len(whole)
    features.clear_memory_cache()  # a new process: only the disk cache is left

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(features, "encode_dataset", no_encoding)
    served = features.profile_store(profile, tiny_backbone, "medical", "test", per_class=2)
    for f in ("global_", "patches", "image_keys"):
        assert torch.equal(getattr(served.feats, f), getattr(alone.feats, f)), f
    assert torch.equal(served.masks, alone.masks) and torch.equal(served.labels, alone.labels)
    assert (served.cls_names, served.paths, served.has_mask, served.indices) == (
        alone.cls_names, alone.paths, alone.has_mask, alone.indices)
    assert served.dataset.samples == alone.dataset.samples
    a, b = next(alone.batches(4, with_images=True)), next(served.batches(4, with_images=True))
    assert torch.equal(a.images, b.images)
