import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffusers_fair.utils import (
    atomic_save_file,
    atomic_write,
    atomic_write_folder,
    atomic_write_json,
    atomic_write_text,
)


def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "evaluation.json"
    atomic_write_json(path, {"bias": 0.5, "name": "é"})
    atomic_write_json(path, {"bias": 0.25})
    assert json.loads(path.read_text(encoding="utf-8")) == {"bias": 0.25}
    atomic_write_text(tmp_path / "card.md", "a\nb\n")
    assert (tmp_path / "card.md").read_bytes() == b"a\nb\n"
    tensors = {"w": torch.arange(6.0).view(2, 3)}
    atomic_save_file(tensors, tmp_path / "w.safetensors", metadata={"prompt": "a nurse"})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], tensors["w"])
    assert sorted(os.listdir(tmp_path)) == ["card.md", "evaluation.json", "w.safetensors"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "evaluation.json"
    atomic_write_json(path, {"bias": 0.5})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bias": object()})  # not serialisable

    def killed(tmp: str) -> None:  # a write interrupted halfway
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"bias": 0.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed)
    assert json.loads(path.read_text(encoding="utf-8")) == {"bias": 0.5}
    assert os.listdir(tmp_path) == ["evaluation.json"]


def test_atomic_write_folder_replaces_the_folder_and_a_killed_write_keeps_the_previous_one(tmp_path):
    folder = tmp_path / "images" / "base"
    atomic_write_folder(folder, lambda tmp: open(os.path.join(tmp, "a.txt"), "w").close())
    atomic_write_folder(folder, lambda tmp: open(os.path.join(tmp, "b.txt"), "w").close())
    assert os.listdir(folder) == ["b.txt"]

    def killed(tmp: str) -> None:
        open(os.path.join(tmp, "c.txt"), "w").close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_folder(folder, killed)
    assert os.listdir(folder) == ["b.txt"]
    # The next write clears what the killed one left.
    atomic_write_folder(folder, lambda tmp: open(os.path.join(tmp, "d.txt"), "w").close())
    assert os.listdir(folder) == ["d.txt"] and sorted(os.listdir(folder.parent)) == ["base"]
