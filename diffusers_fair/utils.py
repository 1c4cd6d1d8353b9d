"""Helpers shared by the scripts: atomic file writes (a crash or kill mid-write leaves the previous file, or none,
never a truncated one) and the check that launched processes really work together."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    r"""
    Writes a file through a temporary one in the same folder, then renames it over `path` (`os.replace` is atomic).

    Args:
        path (`str` or `os.PathLike`): The file to write; its folder must exist.
        write (`Callable[[str], None]`): Writes the complete file to the temporary path it is given.

    The temporary file is `path + ".tmp"`: one writer per path (with several processes, the main one). A write that
    was killed leaves that file behind, and the next write of `path` replaces it. If `write` raises, the temporary file
    is removed and `path` is left as it was.
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_folder(folder: str | os.PathLike, write: Callable[[str], None]) -> None:
    r"""
    Writes a folder through a temporary one beside it (`folder + ".tmp"`), then puts it in the place of `folder`.

    Args:
        folder (`str` or `os.PathLike`): The folder to write; missing parent folders are created.
        write (`Callable[[str], None]`): Writes the folder's complete contents into the (existing, empty) temporary
            folder it is given.

    A write that was killed leaves only the temporary folder, which the next write of `folder` clears; `folder` is
    either absent or complete. Replacing an existing `folder` removes it first, so between that removal and the
    rename it is briefly absent.
    """
    folder = os.fspath(folder)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8, `\\n` line ends) to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data) -> None:
    """Writes `data` as indented JSON (UTF-8, non-ASCII kept) to `path` atomically; nothing is written if `data` is
    not JSON-serialisable (the `TypeError` propagates)."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file(tensors, path, metadata)`, atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def check_processes_joined(accelerator) -> None:
    r"""
    Refuses a launch whose processes would each run alone.

    `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs starts N processes, but Accelerate
    then gives each one `DistributedType.NO` unless `ACCELERATE_USE_CPU=1`: they would train separately and overwrite
    each other's files.

    Args:
        accelerator (`accelerate.Accelerator`): The script's accelerator.

    Raises:
        `ValueError`: the launcher's `WORLD_SIZE` is larger than `accelerator.num_processes`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > accelerator.num_processes:
        raise ValueError(
            f"The launcher started {world_size} processes, but Accelerate found no GPU and runs each one alone: they "
            "would train separately and overwrite each other's files. On CPUs, launch with `ACCELERATE_USE_CPU=1 "
            "accelerate launch --multi_gpu --num_processes N ...` (gloo)."
        )
