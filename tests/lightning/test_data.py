"""DataModules: splits, standardisation, synthetic generation, tabular files and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from torchbp.lightning.data import (
    ArrayDataModule,
    DataConfigError,
    DataError,
    DigitsDataModule,
    EpochSeededSampler,
    SklearnToyDataModule,
    SyntheticDataModule,
    TabularFileDataModule,
)


def _all(ds):
    return ds.tensors


def test_digits_split_stratified_standardised_on_train_only():
    dm = DigitsDataModule(seed=3)
    assert (dm.num_features, dm.num_classes) == (64, 10)
    dm.setup()
    (xtr, ytr), (xva, yva), (xte, yte) = (_all(dm.splits[s]) for s in ("train", "val", "test"))
    assert len(ytr) + len(yva) + len(yte) == 1797
    assert len(yte) == int(0.2 * 1797) and len(yva) == int(0.15 * 1797)
    # stratified: every class in every split, proportions close to the full set's
    for y in (ytr, yva, yte):
        frac = torch.bincount(y, minlength=10).float() / len(y)
        assert frac.min() > 0.07 and frac.max() < 0.13
    # training split is standardised exactly (non-constant columns); val/test use train stats
    std = xtr.std(dim=0, unbiased=False)
    nonconst = std > 0
    torch.testing.assert_close(xtr.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std[nonconst], torch.ones(int(nonconst.sum())), atol=1e-4, rtol=0)
    assert not torch.allclose(xte.mean(0), torch.zeros(64), atol=1e-3)
    # deterministic from the seed, different for another seed
    dm2 = DigitsDataModule(seed=3)
    dm2.setup()
    assert torch.equal(dm2.splits["test"].tensors[1], yte)
    dm3 = DigitsDataModule(seed=4)
    dm3.setup()
    assert not torch.equal(dm3.splits["test"].tensors[0], xte)


def test_epoch_seeded_sampler():
    s = EpochSeededSampler(range(50), seed=1)
    assert isinstance(s, DistributedSampler)  # so Lightning keeps it under DDP
    assert (s.rank, s.num_replicas) == (0, 1)  # no process group: a single process
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    s.set_epoch(0)
    assert list(s) == a and a != b and sorted(a) == list(range(50))
    assert list(EpochSeededSampler(range(5), shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("drop_last", [True, False])
def test_epoch_seeded_sampler_shards_the_single_process_order(drop_last):
    """Rank r of W takes order[r::W]: training drops the last n % W samples, evaluation keeps
    every sample exactly once (uneven shards, no padding)."""
    n, world = 11, 3
    order = list(EpochSeededSampler(range(n), seed=4))
    shards = [
        EpochSeededSampler(range(n), num_replicas=world, rank=r, seed=4, drop_last=drop_last)
        for r in range(world)
    ]
    kept = order[: n - n % world] if drop_last else order
    for r, shard in enumerate(shards):
        assert list(shard) == kept[r::world] and len(shard) == len(kept[r::world])
    assert sorted(i for shard in shards for i in shard) == sorted(kept)


@pytest.mark.parametrize(
    "name, shape", [("iris", (4, 3)), ("wine", (13, 3)), ("breast_cancer", (30, 2))]
)
def test_toy_datasets(name, shape):
    dm = SklearnToyDataModule(name=name)
    assert (dm.num_features, dm.num_classes) == shape
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1] == shape[0]


def test_toy_unknown_name():
    with pytest.raises(DataConfigError, match="unknown toy dataset"):
        SklearnToyDataModule(name="mnist")


def test_subclasses_take_the_base_arguments_by_keyword():
    dm = SklearnToyDataModule(name="wine", val_fraction=0.2, seed=5, standardize=False)
    assert (dm.batch_size, dm.val_fraction, dm.seed, dm.standardize) == (32, 0.2, 5, False)
    assert DigitsDataModule(batch_size=8).batch_size == 8
    with pytest.raises(DataConfigError, match="val_fraction must be in"):
        SklearnToyDataModule(val_fraction=1.5)
    with pytest.raises(TypeError, match="bogus"):
        SklearnToyDataModule(bogus=1)


def test_cli_lists_inherited_arguments_of_subclasses():
    """jsonargparse follows ``**kwargs`` into ``ArrayDataModule.__init__``: the CLI knows every
    argument, with its help text and default."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TabularFileDataModule, "data")
    help_text = parser.format_help()
    for name in ("path", "label_column", "drop_columns", "batch_size", "val_fraction", "seed"):
        assert f"--data.{name}" in help_text, name
    assert "Fraction of samples in the validation split" in help_text
    cfg = parser.parse_args(["--data.path=x.csv", "--data.seed=3"])
    assert cfg.data.seed == 3 and cfg.data.batch_size == 64 and cfg.data.num_workers == 0
    base = ArgumentParser()
    base.add_class_arguments(ArrayDataModule, "data")
    toy = ArgumentParser()
    toy.add_class_arguments(SklearnToyDataModule, "data")
    assert toy.get_defaults().data.batch_size == 32  # its own default wins
    assert set(vars(base.get_defaults().data)) < set(vars(toy.get_defaults().data))


def test_synthetic_deterministic_lazy_and_sharded():
    dm = SyntheticDataModule(n_samples=1000, n_features=5, n_classes=3, batch_size=64, seed=7)
    dl = dm.train_dataloader()
    assert len(dl) == 16
    batches = list(dl)
    assert sum(len(b[1]) for b in batches) == 1000
    assert batches[0][0].shape == (64, 5)
    again = list(dm.train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    # a new epoch visits the same batches in another order
    dl.sampler.set_epoch(1)
    e1 = list(dl)
    assert not torch.equal(e1[0][0], batches[0][0])
    key = lambda bs: sorted(float(b[0].sum()) for b in bs)  # noqa: E731
    assert key(e1) == pytest.approx(key(batches))
    # labels are learnable (mixture classes are separated) and all classes occur
    y = torch.cat([b[1] for b in batches])
    assert set(y.tolist()) == {0, 1, 2}
    # val / test differ from train
    assert not torch.equal(next(iter(dm.val_dataloader()))[0], batches[0][0])


def test_synthetic_shard_holds_in_a_spawned_worker(monkeypatch):
    """A rank's synthetic loader whose worker processes start fresh (spawn, macOS's default;
    forkserver, Linux's from Python 3.14) took every batch: the worker asked torch.distributed
    for the rank, and a fresh process has no process group (rank 0 of 1)."""
    from torchbp.lightning import synthetic_data

    monkeypatch.setattr(synthetic_data, "rank_world", lambda: (1, 2))  # rank 1 of 2
    dm = SyntheticDataModule(n_samples=640, n_features=3, n_classes=2, batch_size=64, seed=2)
    in_process = list(dm.train_dataloader())
    loader = dm.train_dataloader()
    spawned = DataLoader(
        loader.dataset,
        sampler=loader.sampler,
        batch_size=None,
        num_workers=1,
        multiprocessing_context="spawn",
    )
    batches = list(spawned)
    assert len(batches) == len(in_process) == 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, in_process))


def test_synthetic_teacher_and_scale_without_materialising():
    # a million samples: only the batch being produced exists
    dm = SyntheticDataModule(n_samples=1_000_000, n_features=8, kind="teacher", batch_size=4096)
    dl = dm.train_dataloader()
    assert len(dl) == 245
    x, y = next(iter(dl))
    assert x.shape == (4096, 8) and y.max() < 10
    assert not hasattr(dl.dataset, "data")


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def _good_rows(n=40, k=2):
    rng = np.random.default_rng(0)
    return [[f"{v:.3f}" for v in rng.normal(size=3)] + [f"c{i % k}"] for i in range(n)]


def test_tabular_csv_ok(tmp_path):
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], _good_rows(40, 3))
    dm = TabularFileDataModule(path=str(p), label_column="target")
    assert (dm.num_features, dm.num_classes) == (3, 3)
    assert dm.class_names == ["c0", "c1", "c2"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1] == 3


def test_tabular_npz_and_pt(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    y = np.arange(60) % 3
    np.savez(tmp_path / "d.npz", X=X, label=y)
    dm = TabularFileDataModule(path=str(tmp_path / "d.npz"))
    assert (dm.num_features, dm.num_classes) == (4, 3)
    torch.save(
        {"f1": torch.randn(60), "f2": torch.randn(60), "y": torch.tensor(y)}, tmp_path / "d.pt"
    )
    dm = TabularFileDataModule(path=str(tmp_path / "d.pt"), label_column="y")
    assert (dm.num_features, dm.num_classes) == (2, 3)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_file", "data file not found"),
        ("missing_label", "label column 'target' not found.*available columns: a, b, c, y"),
        ("non_numeric", r"non-numeric value 'abc' in column 'b' at row 5"),
        ("nan", r"non-finite value nan in column 'c' at row 7"),
        ("inf", r"non-finite value inf in column 'a' at row 2"),
        ("single_class", r"single class \(\['c0'\]\)"),  # the CSV's label, not index 0
        ("too_few", "too few rows"),
        ("rare_class", r"class\(es\) \['rare'\] have fewer than 3 samples"),
        ("bad_suffix", "unsupported file type"),
    ],
)
def test_tabular_errors(tmp_path, case, match):
    p = tmp_path / "t.csv"
    rows = _good_rows(40, 2)
    label = "target"
    if case == "missing_label":
        label = "y"
    if case == "non_numeric":
        rows[4][1] = "abc"
    if case == "nan":
        rows[6][2] = "nan"
    if case == "inf":
        rows[1][0] = "inf"
    if case == "single_class":
        rows = [r[:3] + ["c0"] for r in rows]
    if case == "too_few":
        rows = rows[:8]
    if case == "rare_class":
        rows[0][3] = "rare"
    _write_csv(p, ["a", "b", "c", label], rows)
    if case == "missing_file":
        p = tmp_path / "nope.csv"
    if case == "bad_suffix":
        p = p.rename(tmp_path / "t.xlsx")
    dm = TabularFileDataModule(path=str(p), label_column="target")
    with pytest.raises(DataError, match=match):
        _ = dm.num_features


@pytest.mark.parametrize("separator, named", [(";", "';'"), ("\t", "tabs")])
def test_a_csv_separated_by_another_character_is_named_as_the_likely_cause(
    tmp_path, separator, named
):
    """A file saved with semicolons (a spreadsheet in a comma-decimal locale) or tabs reads
    as one column, and the label column was reported as not found among 'a;b;c;target'."""
    p = tmp_path / "t.csv"
    rows = [separator.join(r) for r in _good_rows(40, 2)]
    p.write_text("\n".join([separator.join(["a", "b", "c", "target"]), *rows]) + "\n")
    dm = TabularFileDataModule(path=str(p), label_column="target")
    with pytest.raises(DataError, match=f"separated by {named}, not commas") as e:
        _ = dm.num_features
    assert "label column 'target' not found" in str(e.value)


def test_a_continuous_label_column_is_named_as_the_likely_cause(tmp_path):
    """A CSV whose label column holds a continuous target (each row a value of its own) was
    refused as "too few rows: 60 rows with 59 classes", which sent the user after more rows;
    the error now says that every distinct label is a class."""
    rng = np.random.default_rng(0)
    rows = [[f"{a:.4f}", f"{b:.4f}", f"{3000 * c:.0f}"] for a, b, c in rng.random((60, 3))]
    _write_csv(tmp_path / "t.csv", ["a", "b", "price"], rows)
    dm = TabularFileDataModule(path=str(tmp_path / "t.csv"), label_column="price")
    with pytest.raises(DataError, match=r"too few rows.*distinct labels in 60 rows.*class label"):
        _ = dm.num_features
    few = TabularFileDataModule(path=str(tmp_path / "t.csv"), label_column="price")
    rows = [[a, b, "xy"[i % 2]] for i, (a, b, _) in enumerate(rows)]
    _write_csv(tmp_path / "t.csv", ["a", "b", "price"], rows[:8])
    with pytest.raises(DataError, match="too few rows") as e:
        _ = few.num_features  # a few classes in too few rows: no such hint
    assert "distinct labels" not in str(e.value)


@pytest.mark.parametrize("rows", [2000, 20000])
def test_labels_of_many_non_integer_numbers_are_refused_as_a_continuous_target(tmp_path, rows):
    """Prices rounded to 0.1 as the label column: 2000 rows (301 labels) were refused as
    "too few rows ... need at least 2007 rows" without a hint (the continuous-label hint
    wanted more labels than half the rows), and 20000 rows (1001 labels) silently trained
    a 1001-class model. Non-integer numbers of more than 20 distinct values are refused,
    naming the column as a likely regression target and how to give class labels."""
    rng = np.random.default_rng(0)
    prices = np.round(rng.uniform(10.0, 40.0, rows), 1)
    features = rng.normal(size=(rows, 2))
    np.savez(tmp_path / "d.npz", X=features, price=prices.astype(np.float32))
    dm = TabularFileDataModule(path=str(tmp_path / "d.npz"), label_column="price")
    distinct = np.unique(prices)
    with pytest.raises(DataError) as e:
        _ = dm.num_features
    said = str(e.value)
    assert f"label column 'price' holds {len(distinct)} distinct non-integer numbers" in said
    first = ", ".join(f"{v:.1f}" for v in distinct[:3])  # float32's values as written
    assert f"({first}, ..., {distinct[-1]:.1f})" in said, said
    assert "continuous (regression) target" in said and "integer class indices" in said, said


def test_a_few_non_integer_labels_are_classes(tmp_path):
    """Ratings in half steps (ten distinct non-integer numbers) are class labels, and so
    are many distinct whole numbers written with a decimal point (1.0, 2.0, ...)."""
    rng = np.random.default_rng(0)
    ratings = [f"{0.5 * (1 + i % 10):.1f}" for i in range(200)]
    rows = [[f"{a:.3f}", f"{b:.3f}", r] for (a, b), r in zip(rng.normal(size=(200, 2)), ratings)]
    _write_csv(tmp_path / "t.csv", ["a", "b", "stars"], rows)
    dm = TabularFileDataModule(path=str(tmp_path / "t.csv"), label_column="stars")
    assert dm.num_classes == 10 and dm.class_names[:2] == [0.5, 1.0]
    whole = np.arange(300) % 30 + 1.0
    np.savez(tmp_path / "d.npz", X=rng.normal(size=(300, 2)), label=whole)
    assert TabularFileDataModule(path=str(tmp_path / "d.npz")).num_classes == 30


def test_rare_classes_are_named_by_their_labels_the_first_ten_of_them(tmp_path):
    """The rare-class error named a CSV's classes by their indices ("class(es) [0]" for
    the label 'bird'), and listed every one of them: hundreds for a label column of rounded
    values. It names them by the file's labels, ten of them, and counts the rest."""
    rows = _good_rows(150, 2) + [[0.1, 0.2, 0.3, f"r{i:02d}"] for i in range(15)]
    _write_csv(tmp_path / "t.csv", ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(path=str(tmp_path / "t.csv"), label_column="target")
    with pytest.raises(DataError) as e:
        _ = dm.num_features
    rare = [f"r{i:02d}" for i in range(10)]
    assert f"class(es) {rare} and 5 more have fewer than 3 samples" in str(e.value), e.value


def test_a_class_left_out_of_training_is_named_by_its_label_and_long_labels_are_cut(tmp_path):
    """The no-training-row error still named a CSV's class by its index ("class(es) [0]"
    for the label 'rare'), and the label errors printed every character of long labels
    (a free-text column: ten labels of 300 characters made one 3000-character line).
    Labels are named, each cut after 40 characters of its repr, its length said."""
    rng = np.random.default_rng(0)
    rows = [
        [f"{v:.3f}" for v in rng.normal(size=3)] + ["rare" if i < 3 else "x"] for i in range(103)
    ]
    _write_csv(tmp_path / "t.csv", ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(
        path=str(tmp_path / "t.csv"), label_column="target", val_fraction=0.45, test_fraction=0.45
    )
    with pytest.raises(DataError, match=r"class\(es\) \['rare'\] have no row in the training"):
        dm.setup()
    long_label = "Ünïcødé " + "w" * 292
    rows = _good_rows(150, 2) + [[0.1, 0.2, 0.3, long_label]]
    _write_csv(tmp_path / "t.csv", ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(path=str(tmp_path / "t.csv"), label_column="target")
    with pytest.raises(DataError) as e:
        _ = dm.num_features
    shown = f"{repr(long_label)[:40]}... (302 characters)"
    assert f"class(es) [{shown}] have fewer than 3 samples" in str(e.value), e.value


def test_tabular_npz_errors(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((30, 2)), label=np.zeros(29))
    with pytest.raises(DataError, match="30 feature rows but 29 labels"):
        _ = TabularFileDataModule(path=str(tmp_path / "d.npz")).num_features
    X = np.ones((30, 2))
    X[3, 1] = np.nan
    np.savez(tmp_path / "e.npz", X=X, label=np.arange(30) % 2)
    with pytest.raises(DataError, match=r"column 'X\[1\]' at row 4"):
        _ = TabularFileDataModule(path=str(tmp_path / "e.npz")).num_features


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        # one column array of another length: np.stack's "all input arrays must have the
        # same shape", naming neither the file nor the array
        ({"a": np.ones(30), "b": np.ones(29)}, r"array 'b' has 29 values, 'label' has 30"),
        # a 2-D array without features_key: np.stack failed alike
        ({"a": np.ones(30), "b": np.ones((30, 2))}, r"array 'b' has shape \(30, 2\).*features_key"),
        # one-hot labels: "30 feature rows but 60 labels"
        ({"a": np.ones(30), "label": np.eye(2)[np.arange(30) % 2]}, r"one-hot"),
    ],
    ids=["short-column", "2d-column", "one-hot-labels"],
)
def test_tabular_array_columns_of_other_shapes_are_named(tmp_path, suffix, arrays, match):
    arrays = {"label": np.arange(30) % 2, **arrays}
    p = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(p, **arrays)
    else:
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, p)
    with pytest.raises(DataError, match=rf"d\{suffix}: .*{match}"):
        _ = TabularFileDataModule(path=str(p)).num_features


def _two_class_csv(path, column_a):
    rng = np.random.default_rng(1)
    rows = [[a, f"{rng.normal():.3f}", i % 2] for i, a in enumerate(column_a)]
    _write_csv(path, ["a", "b", "target"], rows)
    return TabularFileDataModule(path=str(path), label_column="target")


def test_tabular_standardises_in_float64_so_large_values_keep_their_information(tmp_path):
    """Timestamps (1.7e9 + seconds) are 128 apart in float32: standardised after a cast to
    float32 they collapsed to a constant column; a value beyond float32's range (finite in the
    file) became inf, and the standardised column NaN."""
    dm = _two_class_csv(tmp_path / "ts.csv", [f"{1.7e9 + i:.0f}" for i in range(60)])
    x = dm.splits["train"].tensors[0][:, 0]
    assert len(torch.unique(x)) == len(x)
    torch.testing.assert_close(x.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    dm = _two_class_csv(tmp_path / "huge.csv", ["1e39" if i == 5 else f"{i}" for i in range(60)])
    for split in dm.splits.values():
        assert torch.isfinite(split.tensors[0]).all()


def test_tabular_value_beyond_float32_without_standardisation_is_a_data_error(tmp_path):
    _two_class_csv(tmp_path / "huge.csv", ["-1e39" if i == 5 else f"{i}" for i in range(60)])
    dm = TabularFileDataModule(
        path=str(tmp_path / "huge.csv"), label_column="target", standardize=False
    )
    with pytest.raises(DataError, match=r"-1e\+39 in column 'a' at row 6 .*float32"):
        _ = dm.splits


def test_tabular_csv_empty_label_is_a_data_error(tmp_path):
    """A row with an empty label cell was a class of its own (''), and with the numeric labels
    turned into strings, '10' sorted before '9'."""
    rows = _good_rows(40, 2)
    for r in (6, 7, 8):
        rows[r][3] = " "
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(path=str(p), label_column="target")
    with pytest.raises(DataError, match=r"empty label in column 'target' at row 7 \(3 in total"):
        _ = dm.num_classes


def test_tabular_unknown_drop_column_is_a_data_error(tmp_path):
    """A misspelt drop_columns entry was ignored: the column it meant stayed a feature."""
    p = tmp_path / "t.csv"
    rows = [[i, *r] for i, r in enumerate(_good_rows(40, 2))]
    _write_csv(p, ["id", "a", "b", "c", "target"], rows)
    _ = TabularFileDataModule(path=str(p), label_column="target", drop_columns=["id"]).arrays
    dm = TabularFileDataModule(path=str(p), label_column="target", drop_columns=["ID", "x"])
    with pytest.raises(DataError, match=r"drop_columns 'ID', 'x' not found in .*: id, a, b, c$"):
        _ = dm.num_features
    np.savez(tmp_path / "d.npz", X=np.ones((30, 2)), label=np.arange(30) % 2, idx=np.arange(30))
    dm = TabularFileDataModule(path=str(tmp_path / "d.npz"), drop_columns=["index"])
    with pytest.raises(DataError, match=r"drop_columns 'index' not found in .*: X, idx"):
        _ = dm.num_features
    dm = TabularFileDataModule(path=str(p), label_column="target", drop_columns=["target"])
    with pytest.raises(DataError, match="drop_columns names the label column 'target'"):
        _ = dm.num_features


def test_split_that_cannot_be_stratified_is_a_data_error(tmp_path):
    """Classes of 3, 4 and 5 rows with test_fraction=0.5 leave one row of a class for the
    val/train split: scikit-learn's ValueError came out of ``setup`` unexplained."""
    rng = np.random.default_rng(0)
    counts = (3, 4, 5, 100)
    rows = [
        [f"{v:.3f}" for v in rng.normal(size=3)] + [k]
        for k, c in enumerate(counts)
        for _ in range(c)
    ]
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(
        path=str(p), label_column="target", val_fraction=0.3, test_fraction=0.5
    )
    with pytest.raises(DataError, match=r"cannot split .* stratified.*val_fraction=0.3"):
        dm.setup()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"seed": -1}, r"seed must be in \[0, 4294967294\], got -1"),
        ({"seed": 2**32 - 1}, r"seed must be in \[0, 4294967294\], got 4294967295"),
    ],
)
def test_array_module_refuses_bad_workers_and_seeds_when_made(kwargs, match):
    """Before, a negative num_workers failed in DataLoader inside trainer.fit, and a seed that
    scikit-learn's split refuses (it also uses seed + 1) failed when the data was split."""
    with pytest.raises(DataConfigError, match=match):
        DigitsDataModule(**kwargs)
    DigitsDataModule(seed=2**32 - 2).setup()


@pytest.mark.parametrize("seed", [-1, 2**32, 2**62])
def test_synthetic_module_refuses_a_seed_out_of_range_when_made(seed):
    """A seed of 2**62 was taken, and the first batch failed deep inside ("Overflow when
    unpacking long long": its generator's seed is about 3e6 times it)."""
    with pytest.raises(DataConfigError, match=rf"^seed must be in \[0, 4294967295\], got {seed}$"):
        SyntheticDataModule(seed=seed)
    largest = SyntheticDataModule(seed=2**32 - 1, n_samples=10, n_features=2)
    assert next(iter(largest.train_dataloader()))[0].shape == (10, 2)


def test_synthetic_module_refuses_negative_workers_when_made():
    with pytest.raises(DataConfigError, match="num_workers must be >= 0, got -2"):
        SyntheticDataModule(num_workers=-2)


@pytest.mark.parametrize("name", ["n_test", "batch_size"])
def test_synthetic_module_names_the_count_below_one(name):
    """``n_test=0`` and ``batch_size=0`` both said "n_test and batch_size must be >= 1",
    naming neither the one at fault nor its value."""
    with pytest.raises(DataConfigError, match=f"^{name} must be >= 1, got 0$"):
        SyntheticDataModule(**{name: 0})


@pytest.mark.parametrize("separation", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", ["gaussian_mixture", "teacher"])
def test_synthetic_module_refuses_a_non_finite_separation(kind, separation):
    """A NaN or infinite separation made NaN inputs (gaussian_mixture) or labels that were
    all class 0 (teacher: argmax of NaN logits), and training ran on them without a word."""
    with pytest.raises(DataConfigError, match=f"separation must be finite, got {separation}"):
        SyntheticDataModule(kind=kind, separation=separation)


def test_tabular_csv_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte order mark: it was read into the first column's
    name, so a label column named first was "not found" (listed, invisibly, as present)."""
    p = tmp_path / "excel.csv"
    _write_csv(p, ["target", "a", "b", "c"], [[r[3], *r[:3]] for r in _good_rows(40, 2)])
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    dm = TabularFileDataModule(path=str(p), label_column="target")
    assert (dm.num_features, dm.num_classes, dm.feature_names) == (3, 2, ["a", "b", "c"])


def test_a_class_left_out_of_the_training_split_is_a_data_error(tmp_path):
    """3 rows of class 0 among 103, val_fraction = test_fraction = 0.45: the stratified split
    rounds class 0 to 1 test and 2 val rows and none for training, so the model never saw
    class 0 (and its 'stratified' split trained silently)."""
    rng = np.random.default_rng(0)
    rows = [[f"{v:.3f}" for v in rng.normal(size=3)] + [int(i >= 3)] for i in range(103)]
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(
        path=str(p), label_column="target", val_fraction=0.45, test_fraction=0.45
    )
    with pytest.raises(DataError, match=r"class\(es\) \[0\] .* no row in the training split"):
        dm.setup()


def test_tabular_csv_duplicate_column_names_are_a_data_error(tmp_path):
    """A header naming a column twice: the second 'target' (a copy of the labels, say) was
    read as a feature, and a duplicated feature name made messages ambiguous."""
    p = tmp_path / "t.csv"
    _write_csv(
        p, ["target", "a", "b", "target"], [[r[3][1:], *r[:2], r[3][1:]] for r in _good_rows(40, 2)]
    )
    dm = TabularFileDataModule(path=str(p), label_column="target")
    with pytest.raises(DataError, match=r"column name\(s\) 'target' appear more than once"):
        _ = dm.num_features


def test_unreadable_array_files_are_data_errors(tmp_path):
    """A .pt holding numpy arrays (torch.load(weights_only=True) refuses them) or a corrupt
    file raised pickle's UnpicklingError, which torchbp-train showed as a traceback, or a
    ValueError about "pickled (object) data" for a corrupt .npz."""
    torch.save({"X": np.ones((30, 2)), "label": np.arange(30) % 2}, tmp_path / "np.pt")
    with pytest.raises(DataError, match=r"np\.pt: cannot load .*save torch tensors"):
        _ = TabularFileDataModule(path=str(tmp_path / "np.pt")).num_features
    for name in ("bad.pt", "bad.npz"):
        (tmp_path / name).write_bytes(b"not a file of arrays")
        with pytest.raises(DataError, match=rf"{name}: cannot load"):
            _ = TabularFileDataModule(path=str(tmp_path / name)).num_features


class _Labels(ArrayDataModule):
    """An ArrayDataModule of 60 rows with the given labels."""

    def __init__(self, labels, **kwargs):
        super().__init__(**kwargs)
        self.labels = labels

    def _load_arrays(self):
        return np.random.default_rng(0).normal(size=(60, 3)), self.labels


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.arange(60) % 3 - 1, r"labels must be in 0\.\.C-1, got -1 \(row 1\)"),
        (np.arange(60) % 2 + 0.5, r"labels must be integers, got 0\.5 \(row 1\)"),
        (np.arange(59) % 2, "60 feature rows but 59 labels"),
    ],
)
def test_array_module_refuses_labels_it_would_misread(labels, match):
    """Labels -1 became num_classes 2 for 3 classes (and -100 would be ignored by the loss);
    0.5 and 1.5 were truncated to 0 and 1; a label short of the rows failed in scikit-learn."""
    with pytest.raises(DataError, match=match):
        _ = _Labels(labels).num_classes
    assert _Labels(np.arange(60) % 3.0).num_classes == 3  # integral floats are fine


def test_tabular_csv_nan_among_numeric_labels_is_a_data_error(tmp_path):
    """'nan' among numeric labels made every label a string: 'nan' a class of its own, and
    '10' sorted before '2' (an .npz's NaN label was already an error)."""
    rows = [[*r[:3], i % 12] for i, r in enumerate(_good_rows(60, 2))]
    rows[4][3] = "nan"
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(path=str(p), label_column="target")
    with pytest.raises(DataError, match=r"non-finite label nan in column 'target' at row 5"):
        _ = dm.num_classes


def test_a_checkpoint_refuses_a_datamodule_that_splits_the_data_otherwise(tmp_path):
    """trainer.test(ckpt_path=...) with a DataModule of another split seed evaluated the model
    on rows it had trained on, silently."""

    from torchbp.lightning import ERMClassifier, SklearnToyDataModule

    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[])
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, datamodule=SklearnToyDataModule(name="iris", seed=1))
    ckpt = trainer.checkpoint_callback.best_model_path
    tester = pl.Trainer(**kwargs)
    with pytest.raises(DataConfigError, match=r"data.seed=2 \(the checkpoint's run: 1\)"):
        tester.test(model, datamodule=SklearnToyDataModule(name="iris", seed=2), ckpt_path=ckpt)
    tester.test(model, datamodule=SklearnToyDataModule(name="iris", seed=1), ckpt_path=ckpt)


def test_tabular_csv_numeric_labels_are_compared_as_numbers(tmp_path):
    """Labels that all read as numbers were compared as text once one was not an integer:
    '1' and '1.0' became two classes, and '10.5' sorted before '9.5'. They are one class
    now, and classes sort by value."""
    spellings = ["1", "1.0", "9.5", "10.5", "01"]
    rows = [[*r[:3], spellings[i % 5]] for i, r in enumerate(_good_rows(60, 2))]
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(path=str(p), label_column="target")
    assert dm.num_classes == 3
    assert dm.class_names == [1.0, 9.5, 10.5]
    _, y = dm.arrays
    assert y[:5].tolist() == [0, 0, 1, 2, 0]


@pytest.mark.parametrize(
    "labels",
    [
        ["9007199254740993", "9007199254740992", "5"],  # beyond 2**53: one float64
        ["12345678901234567891", "12345678901234567890", "5"],  # beyond int64
        ["9007199254740993", "9007199254740992.0", "5"],  # whole, one written as a float
    ],
)
def test_tabular_csv_integer_labels_beyond_float64_stay_distinct_classes(tmp_path, labels):
    """Integer labels (IDs, codes) were compared as float64: two beyond 2**53 that differ
    became one class, silently, and those beyond int64 were named -9223372036854775808.
    Whole-number labels are now compared as the exact integers they spell."""
    rows = [[*r[:3], labels[i % 3]] for i, r in enumerate(_good_rows(60, 2))]
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(path=str(p), label_column="target")
    exact = sorted(int(v.split(".")[0]) for v in labels)
    assert dm.num_classes == 3
    assert dm.class_names == exact
    _, y = dm.arrays
    assert y[:3].tolist() == [exact.index(int(v.split(".")[0])) for v in labels]
    # the class names a checkpoint keeps load with torch.load(weights_only=True)
    saved = tmp_path / "state.pt"
    torch.save(dm.state_dict(), saved)
    assert torch.load(saved, weights_only=True)["class_names"] == exact


def test_a_checkpoint_refuses_data_whose_classes_are_other_ones(tmp_path):
    """A model trained on labels cat/dog/fox, tested (or asked to predict) on a file labelled
    ant/cat/dog, was silently scored with class 0 meaning 'cat' to the model and 'ant' to
    the data, and predictions.csv named its predictions by the wrong labels. The checkpoint
    now keeps the class names, and data with other classes is refused."""

    from torchbp.lightning import ERMClassifier

    def table(path, names):
        rows = [[*r[:3], names[i % 3]] for i, r in enumerate(_good_rows(60, 2))]
        _write_csv(path, ["a", "b", "c", "y"], rows)
        return TabularFileDataModule(path=str(path), label_column="y")

    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = ERMClassifier(input_size=3, num_classes=3, hidden_sizes=[])
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, datamodule=table(tmp_path / "train.csv", ["cat", "dog", "fox"]))
    ckpt = trainer.checkpoint_callback.best_model_path
    other = table(tmp_path / "other.csv", ["ant", "cat", "dog"])
    with pytest.raises(DataConfigError, match=r"\['cat', 'dog', 'fox'\].*\['ant', 'cat', 'dog'\]"):
        pl.Trainer(**kwargs).test(model, datamodule=other, ckpt_path=ckpt)
    same = table(tmp_path / "same.csv", ["fox", "cat", "dog"])
    pl.Trainer(**kwargs).test(model, datamodule=same, ckpt_path=ckpt)


@pytest.mark.parametrize("missing", ["", " ", "NA", "N/A", "null", "?"])
def test_tabular_csv_missing_feature_value_is_named_as_missing(tmp_path, missing):
    """An empty cell (or a usual missing-value marker) was reported as a "non-numeric value"
    with the advice to drop the whole column; it is a missing value, to fill in or remove."""
    rows = _good_rows(40, 2)
    rows[5][1] = missing
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(path=str(p), label_column="target")
    with pytest.raises(DataError, match=r"missing value .* in column 'b' at row 6 \(line 7\)") as e:
        _ = dm.num_features
    assert "fill in" in str(e.value) and "non-numeric" not in str(e.value)


def test_tabular_csv_without_a_header_row_says_so(tmp_path):
    """A CSV without a header row read its first data row as the header, and the error only
    said the label column was not among columns named '0.126', '-0.132', ..."""
    p = tmp_path / "t.csv"
    _write_csv(p, ["0.5", "1.25", "-3", "1"], [r[:3] + ["1"] for r in _good_rows(40, 2)])
    dm = TabularFileDataModule(path=str(p), label_column="target")
    with pytest.raises(DataError, match=r"its first row holds numbers.*needs a header row"):
        _ = dm.num_features


def test_predict_path_serves_its_rows_scaled_as_the_training_split(tmp_path):
    """predict_path: predict gives one row per row of a new file (columns in any order, no
    label column), scaled with the training split's float64 mean and std; without it,
    predict served only the test split, so new data could not be predicted at all."""
    train = tmp_path / "t.csv"
    _write_csv(train, ["a", "b", "c", "target"], _good_rows(40, 2))
    new_rows = [["1.5", "-2", "0.25"], ["0", "0", "0"], ["3", "1", "-1"]]
    new = tmp_path / "new.csv"
    _write_csv(new, ["c", "a", "b"], [[r[2], r[0], r[1]] for r in new_rows])
    dm = TabularFileDataModule(path=str(train), label_column="target", predict_path=str(new))
    (x,) = next(iter(dm.predict_dataloader()))
    X = np.asarray(new_rows, dtype=np.float64)
    mean, std = dm.mean.double().numpy(), dm.std.double().numpy()
    np.testing.assert_allclose(x.numpy(), (X - mean) / std, rtol=1e-5, atol=1e-5)
    # the same rows through the training file are scaled bit for bit alike
    X_train = dm.arrays[0][:3]
    _write_csv(
        new, ["a", "b", "c", "target"], [[*(repr(float(v)) for v in r), "c0"] for r in X_train]
    )
    (x,) = next(iter(dm.predict_dataloader()))
    first_rows = torch.cat([ds.tensors[0] for ds in dm.splits.values()])
    for row in x:  # each predicted row is, bit for bit, a row of some split
        assert bool((first_rows == row).all(1).any())


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_predict_path_may_lack_the_dropped_columns(tmp_path, suffix):
    """The new rows need the training file's feature columns, not the ones it drops (an id
    column): such a file was refused with "drop_columns 'id' not found in new.csv"; one
    that has the column still has it dropped."""
    rows = [[str(i), *r] for i, r in enumerate(_good_rows(40, 2))]
    train, new, with_id = (tmp_path / f"{n}{suffix}" for n in ("t", "new", "with_id"))
    if suffix == ".csv":
        _write_csv(train, ["id", "a", "b", "c", "target"], rows)
        _write_csv(new, ["a", "b", "c"], [["1", "2", "3"]])
        _write_csv(with_id, ["id", "a", "b", "c"], [["7", "1", "2", "3"]])
    else:
        columns = np.asarray([r[:4] for r in rows], dtype=np.float64).T
        features = dict(zip(["id", "a", "b", "c"], columns))
        np.savez(train, **features, target=np.arange(40) % 2)
        np.savez(new, a=[1.0], b=[2.0], c=[3.0])
        np.savez(with_id, id=[7.0], a=[1.0], b=[2.0], c=[3.0])
    predicted = []
    for path in (new, with_id):
        dm = TabularFileDataModule(
            path=str(train), label_column="target", drop_columns=["id"], predict_path=str(path)
        )
        (x,) = next(iter(dm.predict_dataloader()))
        predicted.append(x)
    assert predicted[0].shape == (1, 3) and torch.equal(predicted[0], predicted[1])


def test_predict_path_with_other_feature_columns_is_refused_naming_them(tmp_path):
    train = tmp_path / "t.csv"
    _write_csv(train, ["a", "b", "c", "target"], _good_rows(40, 2))
    new = tmp_path / "new.csv"
    _write_csv(new, ["a", "b", "d"], [["1", "2", "3"]])
    dm = TabularFileDataModule(path=str(train), label_column="target", predict_path=str(new))
    with pytest.raises(DataError, match=r"missing: \['c'\], not in the training data: \['d'\]"):
        dm.predict_dataloader()
    dm = TabularFileDataModule(path=str(train), label_column="target", predict_path="nope.csv")
    with pytest.raises(DataError, match="predict_path: file not found"):
        dm.predict_dataloader()


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_predict_path_without_rows_is_refused(tmp_path, suffix):
    """A file of new rows with none (a CSV's header alone, empty arrays) predicted nothing
    and wrote no predictions.csv, without a word; the training file's case is an error."""
    train = tmp_path / "t.csv"
    _write_csv(train, ["a", "b", "c", "target"], _good_rows(40, 2))
    new = tmp_path / f"new{suffix}"
    if suffix == ".csv":
        _write_csv(new, ["a", "b", "c"], [])
    else:
        np.savez(new, a=np.zeros(0), b=np.zeros(0), c=np.zeros(0))
    dm = TabularFileDataModule(path=str(train), label_column="target", predict_path=str(new))
    with pytest.raises(DataError, match=r"predict_path .*new.* has no data rows"):
        dm.predict_dataloader()


def test_predict_path_value_beyond_float32_is_named(tmp_path):
    """A new row whose scaled value overflows float32 is a DataError naming the file, the
    value, its column and row (not an inf fed to the model)."""
    train = tmp_path / "t.csv"
    _write_csv(train, ["a", "b", "c", "target"], _good_rows(40, 2))
    new = tmp_path / "new.csv"
    _write_csv(new, ["a", "b", "c"], [["0", "0", "0"], ["1e39", "0", "0"]])
    dm = TabularFileDataModule(
        path=str(train), label_column="target", predict_path=str(new), standardize=False
    )
    with pytest.raises(
        DataError, match=r"predict_path .*new.csv: value 1e\+39 in column 'a' at row 2"
    ):
        dm.predict_dataloader()


def test_tabular_csv_label_beyond_float64_range_is_refused(tmp_path):
    """A label beyond float64's range (1e5000: read as float64, inf) was refused as a
    non-finite label; read as an exact integer it became a class named by a 5001-digit int,
    which str() refuses (Python's 4300-digit limit), and '1e10000000' hung building it."""
    rows = [[*r[:3], ["1", "2", "1e5000"][i % 3]] for i, r in enumerate(_good_rows(30, 2))]
    p = tmp_path / "t.csv"
    _write_csv(p, ["a", "b", "c", "target"], rows)
    dm = TabularFileDataModule(path=str(p), label_column="target")
    with pytest.raises(DataError, match=r"label 1e5000 in column 'target' at row 3 is beyond"):
        dm.arrays  # noqa: B018


def test_poisson_sampling_across_processes_is_refused_by_the_train_loader(monkeypatch):
    """Under DDP the Poisson train loader failed in Lightning (it cannot put a
    DistributedSampler into the batch sampler), and with Lightning's sampler replacement
    off every process drew the same batches: refused by name."""
    import torchbp.lightning.array_data as array_data

    monkeypatch.setattr(array_data, "rank_world", lambda: (0, 2))
    dm = DigitsDataModule(batch_size=64, poisson_sampling=True)
    with pytest.raises(DataConfigError, match="poisson_sampling: true .* 2 processes"):
        dm.train_dataloader()


def _datamodules_with_workers(tmp_path, workers):
    """One DataModule of each kind, each with ``workers`` loader workers; the data file's
    with a ``predict_path`` (its own predict loader)."""
    train, new = tmp_path / "t.csv", tmp_path / "new.csv"
    _write_csv(train, ["a", "b", "c", "target"], _good_rows(40, 2))
    _write_csv(new, ["a", "b", "c"], [["1", "2", "3"]])
    return [
        SklearnToyDataModule(name="iris", num_workers=workers),
        SyntheticDataModule(n_samples=64, n_val=32, n_test=32, num_workers=workers),
        TabularFileDataModule(path=str(train), label_column="target", num_workers=workers),
        TabularFileDataModule(
            path=str(train), label_column="target", predict_path=str(new), num_workers=workers
        ),
    ]


def test_every_loader_of_a_datamodule_takes_its_num_workers(tmp_path):
    """The four dataloaders of every DataModule load with its num_workers; the rows of a
    TabularFileDataModule's predict_path loaded in the main process whatever it said."""
    for dm in _datamodules_with_workers(tmp_path, workers=2):
        for stage in ("train", "val", "test", "predict"):
            loader = getattr(dm, f"{stage}_dataloader")()
            assert loader.num_workers == 2, (type(dm).__name__, stage)


class _RecordsBatches(pl.LightningModule):
    """A plain LightningModule (not ERMClassifier) that records each epoch's batches."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(num_features, 2)
        self.batches: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.setdefault(self.current_epoch, []).append(x.clone())
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_synthetic_batches_are_reshuffled_each_epoch_for_any_lightning_module():
    """SyntheticDataModule(shuffle=True) visits its batches in a new order each epoch: only
    ERMClassifier told its dataset the epoch, so any other LightningModule trained every
    epoch in epoch 0's order."""

    dm = SyntheticDataModule(n_samples=64, n_features=4, n_classes=2, batch_size=8)
    model = _RecordsBatches(num_features=4)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, dm)
    first, second = (torch.stack([b[0] for b in model.batches[e]]) for e in (0, 1))
    assert not torch.equal(first, second)  # another order
    key = lambda rows: sorted(rows.sum(1).tolist())  # noqa: E731
    assert key(first) == pytest.approx(key(second))  # of the same batches


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("kind", ["iris", "synthetic"])
def test_overfit_batches_trains_the_first_batches_without_a_shuffling_warning(
    tmp_path, kind, shuffle
):
    """``trainer.overfit_batches`` warned "You requested to overfit but enabled val
    dataloader shuffling" (and train, with ``shuffle=False`` too): Lightning takes any
    sampler but a SequentialSampler, such as the EpochSeededSampler of loaders that never
    shuffle, for a shuffling one. The fit trains the train split's first batches, in order."""
    import warnings

    from tests.lightning.lightning_helpers import RecordBatches

    from torchbp.lightning import ERMClassifier

    if kind == "iris":
        dm = SklearnToyDataModule(name="iris", batch_size=16, shuffle=shuffle)
    else:
        dm = SyntheticDataModule(n_samples=96, n_val=32, n_test=32, batch_size=16, shuffle=shuffle)
    model = ERMClassifier(input_size=dm.num_features, num_classes=dm.num_classes, hidden_sizes=[])
    record = RecordBatches()
    trainer = pl.Trainer(
        max_epochs=2,
        overfit_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[record],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    assert not [w for w in caught if "overfit" in str(w.message)], [str(w.message) for w in caught]
    rows = dm.train_dataloader().dataset
    if kind == "iris":
        first_rows = [rows[i * 16][0].tolist() for i in range(2)]
    else:  # a dataset of batches
        first_rows = [rows[i][0][0].tolist() for i in range(2)]
    assert [(epoch, i) for epoch, i, _ in record.batches] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [row for _, _, row in record.batches] == first_rows * 2
