"""bnnconvert._utils: the helpers every module shares, each defined once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnnconvert import _utils


def test_atomic_writes_replace_whole_files_and_check_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    _utils.atomic_write_text(target, "one")
    _utils.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    _utils.atomic_torch_save({"x": torch.ones(2)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["x"], torch.ones(2))

    def broken(path, data):  # a write that dies half-way
        with open(path, "wb") as handle:
            handle.write(data[:1])
        raise OSError("disk full")

    monkeypatch.setattr(_utils.Path, "write_bytes", broken, raising=True)
    with pytest.raises(OSError, match="disk full"):
        _utils.atomic_write_bytes(target, b"three")
    monkeypatch.undo()
    assert target.read_bytes() == b"two"  # untouched, and no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "t.pt"]
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        _utils.atomic_write_text(tmp_path / "no" / "x.txt", "x")
    with pytest.raises(ValueError, match="is a folder"):
        _utils.atomic_write_text(tmp_path, "x")


def test_atomic_writes_happen_on_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.setattr(_utils, "is_main_process", lambda: False)
    _utils.atomic_write_text(tmp_path / "a.txt", "x")
    assert not (tmp_path / "a.txt").exists()
    _utils.atomic_write_text(tmp_path / "a.txt", "x", all_ranks=True)
    assert (tmp_path / "a.txt").read_text() == "x"


def test_output_folder_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _utils.check_output_folder(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="parent does not exist"):
        _utils.check_output_folder(tmp_path / "a" / "b")
    assert _utils.check_output_folder(tmp_path / "new") == tmp_path / "new"


def test_payload_header():
    payload = {"format": "bnnconvert.thing", "version": 1}
    assert _utils.check_payload(payload, "bnnconvert.thing", 1, "f", "wrong") is payload
    with pytest.raises(ValueError, match=r"^wrong$"):
        _utils.check_payload({"format": "other"}, "bnnconvert.thing", 1, "f", "wrong")
    with pytest.raises(ValueError, match=r"^wrong$"):
        _utils.check_payload([1, 2], "bnnconvert.thing", 1, "f", "wrong")
    with pytest.raises(ValueError, match="f was written by a newer bnnconvert"):
        _utils.check_payload({**payload, "version": 2}, "bnnconvert.thing", 1, "f", "wrong")


def test_positive_int_one_message_two_types():
    _utils.check_positive_int(a=1, b=np.int64(3))
    for value in (0, -1):
        with pytest.raises(ValueError, match=f"a must be a positive integer, got {value}"):
            _utils.check_positive_int(a=value)
    for value in (1.0, "2", True, None):
        with pytest.raises(TypeError, match="a must be a positive integer"):
            _utils.check_positive_int(a=value)


def test_first_line_json_safe_and_specs():
    assert _utils.first_line(ValueError("one\ntwo")) == "one"
    assert _utils.first_line(KeyError()) == "KeyError"
    record = {"a": math.nan, "b": [1.0, math.inf, (2, None)], 3: "x", "t": torch.device("cpu")}
    assert _utils.json_safe(record) == {"a": None, "b": [1.0, None, [2, None]], "3": "x",
                                        "t": "cpu"}  # fmt: skip
    assert _utils.resolve_factory("bnnconvert.models:UNet").__name__ == "UNet"
    with pytest.raises(ValueError, match="bad data factory spec"):
        _utils.resolve_factory("not a spec", "data factory")


def test_split_batch_and_model_device():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert _utils.split_batch(x) == (x, None)
    got = _utils.split_batch([x, y, "extra"], "cpu", need_target=True)
    assert got[0] is x and got[1] is y
    with pytest.raises(TypeError, match=r"\(input, target\) pair"):
        _utils.split_batch(x, need_target=True)
    with pytest.raises(TypeError, match="cannot read a batch of type dict"):
        _utils.split_batch({"x": x})
    assert _utils.model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert _utils.model_device(torch.nn.ReLU()) is None
