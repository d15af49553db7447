"""The report's JSON form (``report.py``): every field of each check result is written."""

from __future__ import annotations

import json

import torch

from torchbp.verify import check_function


def test_each_check_result_writes_every_field_to_json():
    x = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    data = json.loads(json.dumps(check_function(torch.sin, x, checks="gradcheck").to_dict()))
    assert {"name", "ok", "seconds", "meta", "checks"} <= set(data)
    fields = {"name", "status", "message", "max_abs_err", "max_rel_err", "seconds", "caveat"}
    for check in data["checks"]:
        assert set(check) == fields, check
    gradcheck = next(c for c in data["checks"] if c["name"] == "gradcheck")
    assert gradcheck["max_abs_err"] is not None and gradcheck["max_rel_err"] is not None
