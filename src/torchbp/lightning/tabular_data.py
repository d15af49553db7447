""":class:`TabularFileDataModule`: a user's CSV, NPZ or ``.pt`` file, read with errors that
name the file, column and row of the problem."""

from __future__ import annotations

import csv
import decimal
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchbp.lightning.array_data import ArrayDataModule
from torchbp.lightning.data_base import DataConfigError, DataError, first_nonfinite

__all__ = ["TabularFileDataModule"]


#: CSV cells that stand for a missing value (compared in upper case)
_MISSING_MARKERS = frozenset({"", "NA", "N/A", "NULL", "NONE", "?", "-", "MISSING"})
#: the most distinct labels a label column of non-integer numbers may hold: class labels
#: written as fractions are few (ratings in half steps: 10); more are a continuous target
_MAX_FRACTIONAL_CLASSES = 20


#: the characters other than a comma that a table's fields are often separated by, and
#: how a message names them
_OTHER_SEPARATORS = {";": "';'", "\t": "tabs", "|": "'|'"}


def _header_hint(header: list[str]) -> str:
    """A hint for a CSV whose header is one field holding another separator (a file saved
    with semicolons or tabs reads as one column), or whose first row reads as data (every
    field a number): the file has no header row, and its first data row was taken for one."""
    if len(header) == 1:
        for separator, name in _OTHER_SEPARATORS.items():
            if separator in header[0]:
                return (
                    f" (its header row is one column holding {name}: the file looks "
                    f"separated by {name}, not commas; save it as comma-separated values)"
                )
    try:
        [float(h) for h in header]
    except ValueError:
        return ""
    return (
        " (its first row holds numbers, so it looks like data: the file needs a header row "
        "naming the columns, the label column among them)"
    )


def _is_vector(array: np.ndarray) -> bool:
    """Whether ``array`` holds one value per row: at most one of its dimensions is over 1."""
    return sum(size > 1 for size in array.shape) <= 1


def _exact_integers(values: list[int]) -> np.ndarray:
    """``values`` as int64, or, when one is beyond int64's range, as Python ints (an object
    array, which sorts and compares them exactly)."""
    info = np.iinfo(np.int64)
    if all(info.min <= v <= info.max for v in values):
        return np.asarray(values, dtype=np.int64)
    exact = np.empty(len(values), dtype=object)
    exact[:] = values
    return exact


def _encode_labels(raw: np.ndarray) -> np.ndarray:
    """Map arbitrary labels (ints, floats holding ints, strings) to 0..C-1 in sorted order."""
    _, y = np.unique(raw, return_inverse=True)
    return y.reshape(-1)


class TabularFileDataModule(ArrayDataModule):
    """A user's table: CSV (with a header row), NPZ or ``.pt`` file.

    - CSV: one column is the label (any values; mapped to 0..C-1 in sorted order), every other
      column must be numeric (or listed in ``drop_columns``). Labels that all read as numbers
      are compared as numbers (``1``, ``1.0`` and ``01`` are one class; classes sort by
      value), any other label column as its text (without surrounding spaces).
    - NPZ (numeric arrays) / ``.pt`` (a dict of tensors, read with
      ``torch.load(weights_only=True)``): either a 2-D array under ``features_key`` plus the
      label array under ``label_column``, or one 1-D array per column.

    Errors name the problem precisely: missing file, missing label column, a missing value
    (an empty cell or a marker such as ``NA``) or a non-numeric one (column and row), NaN/inf
    (column and row), a single class, too few rows for the split.

    Args:
        path: Path of the ``.csv``, ``.npz`` or ``.pt`` file.
        label_column: Name of the label column (or array key).
        features_key: For NPZ/``.pt``: key of a 2-D feature array; if absent, every other 1-D
            array is a feature column.
        drop_columns: Columns to ignore (e.g. an id column).
        predict_path: A file of new rows to predict (same format and feature columns; its
            label column and those of ``drop_columns`` may be absent, and are ignored):
            ``predict`` then gives one row of class probabilities per row of this file, in
            its order, its features scaled with the training split's mean and std. Without
            it, ``predict`` predicts the test split.
        **kwargs: The arguments of :class:`ArrayDataModule` (``batch_size``, ``seed``, ...).

    Examples::

        dm = TabularFileDataModule("my.csv", label_column="y", drop_columns=["id"], batch_size=128)
        dm = TabularFileDataModule("my.csv", label_column="y", predict_path="new_rows.csv")
    """

    def __init__(
        self,
        path: str,
        label_column: str = "label",
        features_key: str = "X",
        drop_columns: list[str] | None = None,
        predict_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path = str(path)
        self.predict_path = None if predict_path is None else str(predict_path)
        self.label_column = label_column
        self.features_key = features_key
        self.drop_columns = list(drop_columns or [])
        self.feature_names: list[str] = []
        self.class_names: list = []

    def _source(self) -> dict[str, Any]:
        return {
            "path": os.path.abspath(self.path),
            "label_column": self.label_column,
            "features_key": self.features_key,
            "drop_columns": self.drop_columns,
        }

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints: the source and split settings, and the class names (the
        labels the model's classes ``0..C-1`` stand for)."""
        self.arrays  # noqa: B018 (loads the file, which names the classes)
        return {**super().state_dict(), "class_names": list(self.class_names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to serve a checkpoint's model data whose classes are other ones, or the same
        data split otherwise (see :meth:`ArrayDataModule.load_state_dict`).

        Raises:
            DataConfigError: The checkpoint's run had other class names (another label set, or
                one with a class more or less): the model's class ``k`` would be scored, and
                named in predictions, as this data's ``k``-th label.
        """
        trained_on = state_dict.get("class_names")
        self.arrays  # noqa: B018 (loads the file, which names the classes)
        if trained_on is not None and list(trained_on) != list(self.class_names):
            raise DataConfigError(
                f"the checkpoint's model was trained on the classes {list(trained_on)}, and "
                f"{self.path} has the classes {list(self.class_names)} (label column "
                f"{self.label_column!r}): its class k would be read as another label; use data "
                "with the same labels"
            )
        super().load_state_dict(state_dict)

    def _load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        p = Path(self.path)
        if not p.is_file():
            raise DataError(f"data file not found: {os.path.abspath(p)}")
        names, X, raw_y = self._read_table(p)
        if X.shape[0] == 0:
            raise DataError(f"{p} has no data rows")
        if X.shape[1] == 0:
            raise DataError(f"{p} has no feature columns besides {self.label_column!r}")
        cell = first_nonfinite(X)
        if cell is not None:
            r, c = cell
            raise DataError(
                f"{p}: non-finite value {X[r, c]} in column {names[c]!r} at row {r + 1} "
                f"({int((~np.isfinite(X)).sum())} non-finite value(s) in total); clean or "
                "impute the data"
            )
        self._check_labels_are_not_continuous(p, raw_y)
        self.feature_names = names
        self.class_names = np.unique(raw_y).tolist()
        return X, _encode_labels(raw_y)

    def _check_labels_are_not_continuous(self, p: Path, raw_y: np.ndarray) -> None:
        """Labels that are numbers, some not whole, of more than
        :data:`_MAX_FRACTIONAL_CLASSES` distinct values are a continuous (regression)
        target, such as prices: each distinct value would be a class (a 1001-class model
        trained on prices rounded to 0.1), or the split refused "too few rows" for them.

        Raises:
            DataError: Such labels, naming the column and how to give class labels.
        """
        if raw_y.dtype.kind != "f" or np.all(raw_y == np.round(raw_y)):
            return
        distinct = np.unique(raw_y)
        if len(distinct) <= _MAX_FRACTIONAL_CLASSES:
            return
        first, last = [str(v) for v in distinct[:3]], distinct[-1]  # float32's 0.1 as 0.1
        raise DataError(
            f"{p}: label column {self.label_column!r} holds {len(distinct)} distinct "
            f"non-integer numbers ({', '.join(first)}, ..., {last}): it looks like a "
            "continuous (regression) target, and torchbp-train trains classifiers, which "
            "would make each distinct value a class; if the column really holds class "
            "labels, give them as integer class indices (or, in a CSV, as text such as "
            f"'c{first[0]}')"
        )

    def _column_name(self, j: int) -> str:
        return str(self.feature_names[j])

    def _label_of(self, index: int) -> Any:
        """The label of class ``index`` as the file writes it (``'bird'``, not ``0``)."""
        return self.class_names[index]

    # -- new rows to predict --------------------------------------------------------------
    def check_predict_data(self) -> None:
        """Read ``predict_path`` now: a missing file or column, or a bad value, is a
        :class:`DataError` before ``predict`` starts (it was raised by
        :meth:`predict_dataloader`, a traceback once the run folder was written)."""
        if self.predict_path is not None:
            self._predict_features()

    def predict_dataloader(self) -> DataLoader:
        """The rows of ``predict_path`` (see the class docstring), else the test split."""
        if self.predict_path is None:
            return super().predict_dataloader()
        features = torch.from_numpy(self._predict_features())
        return DataLoader(
            TensorDataset(features),
            batch_size=self.batch_size,
            shuffle=False,
            **self._loader_options(),
        )

    def _predict_features(self) -> np.ndarray:
        """``predict_path``'s feature columns, in the training file's order, scaled as the
        training split was (float32)."""
        p = Path(self.predict_path)
        self.setup()  # the training split's mean and std (and feature names)
        if not p.is_file():
            raise DataError(f"predict_path: file not found: {os.path.abspath(p)}")
        names, X = self._read_table(p, new_rows=True)[:2]
        if X.shape[0] == 0:
            raise DataError(f"predict_path {p} has no data rows: nothing to predict")
        missing = [n for n in self.feature_names if n not in names]
        extra = [n for n in names if n not in self.feature_names]
        if missing or extra:
            raise DataError(
                f"predict_path {p}: its feature columns must be those of {self.path}; "
                f"missing: {missing or 'none'}, not in the training data: {extra or 'none'} "
                "(list columns to ignore in drop_columns)"
            )
        X = X[:, [names.index(n) for n in self.feature_names]]
        cell = first_nonfinite(X)
        if cell is not None:
            r, c = cell
            raise DataError(
                f"predict_path {p}: non-finite value {X[r, c]} in column "
                f"{self.feature_names[c]!r} at row {r + 1}"
            )
        mean, std = self._scaling
        return self._as_float32((X - mean) / std, raw=X, where=f"predict_path {p}: ")

    def _read_table(
        self, p: Path, new_rows: bool = False
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """``(feature names, X, raw labels)`` of a ``.csv``, ``.npz`` or ``.pt`` file. A file of
        ``new_rows`` to predict (``predict_path``) needs no label column (its labels are
        ``None``: one it has is ignored) and may lack the columns ``drop_columns`` names."""
        suffix = p.suffix.lower()
        if suffix == ".csv":
            return self._read_csv(p, new_rows)
        if suffix in (".npz", ".pt", ".pth"):
            return self._read_arrays(p, new_rows)
        raise DataError(f"unsupported file type {suffix!r} ({p}); use .csv, .npz or .pt")

    def _missing_label(self, p: Path, columns: list[str], hint: str = "") -> DataError:
        return DataError(
            f"label column {self.label_column!r} not found in {p}; available columns: "
            f"{', '.join(map(str, columns))}{hint}"
        )

    def _read_csv(
        self, p: Path, new_rows: bool = False
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        # utf-8-sig: UTF-8 without the byte order mark that Excel writes before the header
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise DataError(f"{p} is empty (expected a header row)") from None
            self._check_unique_names(p, header)
            if self.label_column not in header and not new_rows:
                raise self._missing_label(p, header, _header_hint(header))
            li = header.index(self.label_column) if self.label_column in header else None
            if not new_rows:
                self._check_drop_columns(p, [h for i, h in enumerate(header) if i != li])
            keep = [i for i, h in enumerate(header) if i != li and h not in set(self.drop_columns)]
            rows: list[list[float]] = []
            labels: list[str] = []
            label_rows: list[int] = []  # each label's row number in the file
            for r, row in enumerate(reader, start=1):
                if not row or all(not v.strip() for v in row):
                    continue  # blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{p}: row {r} (line {reader.line_num}) has {len(row)} fields, "
                        f"the header has {len(header)}"
                    )
                where = f"in column {{}} at row {r} (line {reader.line_num})"
                vals = []
                for i in keep:
                    v = row[i].strip()
                    try:
                        vals.append(float(v))
                    except ValueError:
                        raise self._not_a_number(p, v, where.format(repr(header[i]))) from None
                rows.append(vals)
                if not new_rows:
                    labels.append(row[li].strip())
                    label_rows.append(r)
        X = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(keep))
        names = [header[i] for i in keep]
        if new_rows:  # a label column there is ignored
            return names, X, None
        self._check_no_empty_label(p, [r for r, v in zip(label_rows, labels) if not v])
        return names, X, self._numeric_if_possible(p, labels, label_rows)

    @staticmethod
    def _not_a_number(p: Path, value: str, where: str) -> DataError:
        """The error for a feature cell ``value`` that is no number: a missing value (empty, or
        a usual marker such as ``NA``) or a non-numeric one."""
        if value.upper() in _MISSING_MARKERS:
            return DataError(
                f"{p}: missing value {value!r} {where}; fill in the value (impute it) or remove "
                "the row"
            )
        return DataError(
            f"{p}: non-numeric value {value!r} {where}; feature columns must be numbers "
            "(drop the column with drop_columns)"
        )

    def _numeric_if_possible(self, p: Path, labels: list[str], rows: list[int]) -> np.ndarray:
        """CSV labels as numbers when they all read as numbers (so "1", "1.0" and "01" are
        one class, and "10" sorts after "9"): the exact integers when every value is whole
        (IDs beyond float64's 2**53 stay apart), else floats; otherwise the text. Numbers
        with a NaN or inf among them are a :class:`DataError` (a missing label), and so
        are those beyond float64's range (no ID: 1e5000 would be a 5001-digit class)."""
        try:
            numbers = [decimal.Decimal(v) for v in labels]
        except decimal.InvalidOperation:
            return np.asarray(labels)
        for i, number in enumerate(numbers):
            where = f"{labels[i]} in column {self.label_column!r} at row {rows[i]}"
            if not number.is_finite():
                raise DataError(
                    f"{p}: non-finite label {where}; label every row or remove the unlabelled ones"
                )
            if math.isinf(float(number)):
                raise DataError(
                    f"{p}: label {where} is beyond float64's range (about 1.8e308); "
                    "use labels of a usual size"
                )
        if all(n == n.to_integral_value() for n in numbers):
            return _exact_integers([int(n) for n in numbers])
        return np.asarray([float(n) for n in numbers], dtype=np.float64)

    @staticmethod
    def _check_unique_names(p: Path, header: list[str]) -> None:
        """Each column is named once (a second label column would be read as a feature)."""
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise DataError(
                f"{p}: column name(s) {', '.join(map(repr, repeated))} appear more than once "
                "in the header; rename or remove the copies"
            )

    def _check_drop_columns(self, p: Path, columns: list[str]) -> None:
        """Every name in ``drop_columns`` is one of ``columns`` (a misspelt one would leave
        the column it meant among the features)."""
        if self.label_column in self.drop_columns:
            raise DataError(f"drop_columns names the label column {self.label_column!r}")
        unknown = [c for c in self.drop_columns if c not in columns]
        if unknown:
            raise DataError(
                f"drop_columns {', '.join(map(repr, unknown))} not found in {p}; available "
                f"columns: {', '.join(map(str, columns))}"
            )

    def _check_no_empty_label(self, p: Path, rows: list[int]) -> None:
        """An empty label cell (at data rows ``rows``) is a missing label, not a class of
        its own."""
        if rows:
            raise DataError(
                f"{p}: empty label in column {self.label_column!r} at row {rows[0]} "
                f"({len(rows)} in total); label every row or remove the unlabelled ones"
            )

    @staticmethod
    def _load_npz(p: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{p}: cannot load it as an .npz of numeric arrays (np.savez): {cause}"
            ) from e

    @staticmethod
    def _load_pt(p: Path) -> dict[str, np.ndarray]:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(
                f"{p}: cannot load it as a dict of tensors with torch.load(weights_only=True) "
                f"({type(e).__name__}); save torch tensors (not numpy arrays or other objects) "
                "with torch.save, or numpy arrays with np.savez as an .npz"
            ) from e
        if not isinstance(obj, dict):
            raise DataError(f"{p} must hold a dict of tensors, got {type(obj).__name__}")
        return {
            str(k): (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in obj.items()
        }

    def _label_vector(self, p: Path, labels: Any) -> np.ndarray:
        """The label array as one label per row (shape ``(N,)``, ``(N, 1)`` or ``(1, N)``);
        a matrix (one-hot labels) is a :class:`DataError`: flattened, it gave ``C`` labels
        per row."""
        labels = np.asarray(labels)
        if not _is_vector(labels):
            raise DataError(
                f"{p}: label array {self.label_column!r} has shape {labels.shape}; one label "
                "per row is needed (one-hot labels? save their argmax, the class indices)"
            )
        return labels.reshape(-1)

    def _feature_columns(
        self, p: Path, data: dict[str, np.ndarray], labels: np.ndarray | None
    ) -> list[np.ndarray]:
        """Without a ``features_key`` array, each array is one feature column: 1-D (or
        ``(N, 1)``), as long as the labels (else as the first column). An array of another
        shape or length is a :class:`DataError` naming it (``np.stack`` only said that
        "all input arrays must have the same shape")."""
        columns = []
        for name, array in data.items():
            array = np.asarray(array)
            if not _is_vector(array):
                raise DataError(
                    f"{p}: array {name!r} has shape {array.shape}; with no "
                    f"{self.features_key!r} array (features_key) every array besides the "
                    "label is one feature column (1-D): save a feature matrix under "
                    "features_key"
                )
            columns.append(array.reshape(-1))
        reference = (self.label_column, labels) if labels is not None else None
        if reference is None and columns:
            reference = (next(iter(data)), columns[0])
        for name, column in zip(data, columns):
            if reference is not None and len(column) != len(reference[1]):
                raise DataError(
                    f"{p}: array {name!r} has {len(column)} values, {reference[0]!r} has "
                    f"{len(reference[1])}; every column needs one value per row"
                )
        return columns

    def _read_arrays(
        self, p: Path, new_rows: bool = False
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        data = self._load_npz(p) if p.suffix.lower() == ".npz" else self._load_pt(p)
        if self.label_column not in data and not new_rows:
            raise self._missing_label(p, list(data))
        raw_y = data.pop(self.label_column, None)
        if new_rows:  # a label array there is ignored
            raw_y = None
        raw_y = None if raw_y is None else self._label_vector(p, raw_y)
        if not new_rows:
            self._check_drop_columns(p, list(data))
        for c in self.drop_columns:
            data.pop(c, None)
        if self.features_key in data:
            X = np.asarray(data[self.features_key])
            if X.ndim != 2:
                raise DataError(
                    f"{p}: {self.features_key!r} must be 2-D (rows, features), got {X.shape}"
                )
            names = [f"{self.features_key}[{j}]" for j in range(X.shape[1])]
        else:
            names = list(data)
            cols = self._feature_columns(p, data, raw_y)
            X = (
                np.stack(cols, axis=1)
                if cols
                else np.zeros((0 if raw_y is None else len(raw_y), 0))
            )
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            raise DataError(f"{p}: features must be real numbers, got dtype {X.dtype}")
        if raw_y is None:
            return names, X.astype(np.float64), None
        if X.shape[0] != raw_y.shape[0]:
            raise DataError(f"{p}: {X.shape[0]} feature rows but {raw_y.shape[0]} labels")
        cell = first_nonfinite(raw_y) if raw_y.dtype.kind == "f" else None
        if cell is not None:
            (r,) = cell
            raise DataError(f"{p}: non-finite label in column {self.label_column!r} at row {r + 1}")
        return names, X.astype(np.float64), raw_y
