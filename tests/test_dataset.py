"""The on-disk dataset: build, load, splits, sampling, external renders, and clear errors on corrupt folders."""

import json
import shutil

import numpy as np
import pytest
import torch

from spinmeround_lite import dataset as D
from spinmeround_lite.profiles import get_profile
from spinmeround_lite.runs import Run

TINY = get_profile("test").replace(name="tiny", resolution=16, identities=4, heldout_identities=1,
                                   views_per_identity=6)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    D.build_dataset(root, TINY, seed=0)
    return root


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(built, dst)
    return dst


def test_build_writes_the_documented_format(built):
    meta = json.loads((built / "dataset.json").read_text())
    assert meta["format"] == D.FORMAT and meta["resolution"] == 16 and meta["views_per_identity"] == 6
    assert len(meta["identities"]) == 4
    with np.load(built / f"{meta['identities'][0]}.npz") as z:
        assert z["rgb"].shape == (6, 16, 16, 3) and z["rgb"].dtype == np.uint8
        assert z["normal"].shape == (6, 16, 16, 3) and z["alpha"].shape == (6, 16, 16)
        assert z["c2w"].shape == (6, 4, 4) and z["K"].shape == (3, 3) and z["params"].ndim == 1
        assert (z["rgb"][z["alpha"] == 0] == 255).all() and (z["normal"][z["alpha"] == 0] == 255).all()
    assert not list(built.glob("*.tmp"))


def test_splits_are_disjoint_and_views_have_documented_shapes(built):
    train, held, all_ = (D.HeadDataset(built, s) for s in ("train", "heldout", "all"))
    assert len(train) == 3 and len(held) == 1 and len(all_) == 4
    assert not set(train.ids) & set(held.ids)
    v = train.views(0, [0, 2, 5])
    assert v["rgb"].shape == (3, 3, 16, 16) and v["alpha"].shape == (3, 1, 16, 16)
    assert v["normal"].shape == (3, 3, 16, 16) and v["K"].shape == (3, 3, 3) and v["c2w"].shape == (3, 4, 4)
    assert 0 <= v["rgb"].min() and v["rgb"].max() <= 1
    norms = v["normal"].norm(dim=1)
    fg = v["alpha"][:, 0] > 0
    assert torch.allclose(norms[fg], torch.ones_like(norms[fg]), atol=1e-4) and (norms[~fg] == 0).all()
    assert train.identity_index(train.ids[2]) == 2
    with pytest.raises(KeyError):
        train.identity_index(held.ids[0])
    assert train.params(0).shape == (len(D.HeadParams.names()),)


def test_sample_views_gives_distinct_views_reproducibly(built):
    ds = D.HeadDataset(built, "train")
    a = ds.sample_views(1, 5, torch.Generator().manual_seed(3))
    b = ds.sample_views(1, 5, torch.Generator().manual_seed(3))
    assert len(set(a["index"].tolist())) == 5 and torch.equal(a["rgb"], b["rgb"])
    with pytest.raises(ValueError):
        ds.sample_views(1, 7)


def test_nearest_view(built):
    ds = D.HeadDataset(built, "all")
    yaw, pitch = ds.angles(0)
    for j in range(6):
        assert ds.nearest_view(0, float(yaw[j]) + 1.0, float(pitch[j])) == j
    assert ds.nearest_view(0, 359.0) == 0                        # yaw wraps around


def test_missing_npz_is_named(copy):
    (copy / "id00002.npz").unlink()
    with pytest.raises(D.DatasetError, match="id00002.npz is missing"):
        D.HeadDataset(copy)


def _rewrite(path, **change):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in change.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    D.write_identity(path, arrays)


def test_missing_key_is_named(copy):
    _rewrite(copy / "id00001.npz", normal=None)
    with pytest.raises(D.DatasetError, match=r"id00001.npz has no array 'normal'"):
        D.validate_dataset(copy)


def test_wrong_shape_is_named(copy):
    _rewrite(copy / "id00000.npz", rgb=np.zeros((6, 8, 8, 3), np.uint8))
    with pytest.raises(D.DatasetError, match=r"id00000.npz: 'rgb' has shape \(6, 8, 8, 3\), expected \(6, 16, 16, 3\)"):
        D.HeadDataset(copy)


def test_not_a_zip_is_named(copy):
    (copy / "id00003.npz").write_bytes(b"not a zip")
    with pytest.raises(D.DatasetError, match="id00003.npz is not a readable .npz"):
        D.validate_dataset(copy)


def test_bad_dataset_json(copy):
    (copy / "dataset.json").write_text("{not json")
    with pytest.raises(D.DatasetError, match="dataset.json is not valid JSON"):
        D.HeadDataset(copy)
    meta = json.loads(json.dumps({"format": D.FORMAT, "resolution": 16, "views_per_identity": 6,
                                  "identities": ["id00000"], "splits": {"train": ["id00000"],
                                                                         "heldout": ["id00000"]}}))
    (copy / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(D.DatasetError, match="both train and heldout"):
        D.HeadDataset(copy)
    (copy / "dataset.json").unlink()
    with pytest.raises(D.DatasetError, match="dataset.json is missing"):
        D.HeadDataset(copy)
    with pytest.raises(D.DatasetError, match="is not a folder"):
        D.HeadDataset(copy / "nowhere")
    assert issubclass(D.DatasetError, ValueError)


def test_external_renders_without_params_load(tmp_path):
    V, R = 3, 8
    rng = np.random.default_rng(0)
    arrays = lambda: {"rgb": rng.integers(0, 255, (V, R, R, 3), dtype=np.uint8),
                      "alpha": np.full((V, R, R), 255, np.uint8),
                      "normal": rng.integers(0, 255, (V, R, R, 3), dtype=np.uint8),
                      "c2w": np.tile(np.eye(4, dtype=np.float32), (V, 1, 1)),
                      "K": np.eye(3, dtype=np.float32), "yaw": np.zeros(V, np.float32),
                      "pitch": np.zeros(V, np.float32)}
    D.write_external(tmp_path / "ext", {"scan_a": arrays(), "scan_b": arrays()}, heldout=["scan_b"])
    ds = D.HeadDataset(tmp_path / "ext", "train")
    assert ds.ids == ["scan_a"] and ds.params(0) is None
    assert ds.views(0, [1])["rgb"].shape == (1, 3, R, R)


def test_ensure_dataset_builds_once_and_reuses(tmp_path):
    run = Run(TINY, tmp_path / "run", device="cpu")
    root = D.ensure_dataset(run)
    assert Run.is_complete(root)
    stamp = (root / "id00000.npz").stat().st_mtime_ns
    assert D.ensure_dataset(run) == root
    assert (root / "id00000.npz").stat().st_mtime_ns == stamp


def test_extra_heldout_heads_come_from_a_range_no_training_set_reaches(tmp_path):
    """Evaluation-only heads join the held-out split without moving any training head (a reference trained with
    extra training heads has never seen them)."""
    P = TINY.replace(extra_train_identities=2, extra_heldout_identities=2)
    D.build_dataset(tmp_path, P, seed=0)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    held = meta["splits"]["heldout"]
    assert held == D.heldout_names(P) == ["id00003", "id500000", "id500001"]
    assert meta["splits"]["train"] == ["id00000", "id00001", "id00002", "id00004", "id00005"]
    base = TINY.replace(extra_train_identities=2)                 # the same heads without the evaluation extras
    assert set(D.heldout_names(base)) < set(held)
    with np.load(tmp_path / "id500000.npz") as z, np.load(tmp_path / "id00000.npz") as z0:
        assert z["rgb"].shape == (6, 16, 16, 3) and not np.array_equal(z["params"], z0["params"])


def test_training_identities_of_a_fresh_run_folder_are_its_train_split(tmp_path):
    """Notebook 09 run alone in a new folder asks for the training identities before anything was built: the
    protocol builds the dataset first, so the leakage guard knows the train split (it was empty)."""
    from spinmeround_lite.eval_protocol import training_identities
    run = Run(TINY, tmp_path / "run", device="cpu")
    seen = training_identities(run)
    meta = json.loads((run.data_dir / "dataset.json").read_text())
    assert seen and seen == set(meta["splits"]["train"])
