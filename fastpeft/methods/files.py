"""An adapter directory on disk, for every method: `adapter_config.json` + `adapter_model.safetensors`.

A save swaps the two files in together: both are written to a temporary directory beside the target, which then
takes the target's place in one atomic `renameat2(RENAME_EXCHANGE)` (other files of the target directory are carried
over as hard links), so a reader or a killed writer sees the old pair or the new pair, never one of each. Where the
exchange is not available (not Linux, a file system without it or without hard links, sub-directories in the target)
the files are renamed in one by one, weights first; the weights' metadata then records the SHA-256 of the config
they replace, and a load refuses exactly that config beside them (a writer killed between the two renames). A config
edited by hand still loads. Temporary directories of killed writers are removed by the next save or load beside
them.
"""
import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model; other methods follow it
# In the safetensors metadata (peft ignores metadata it does not know): the config saved with these weights, and
# the one that was in the directory before (only that one, beside these weights, is known to be a torn save).
CONFIG_HASH_KEY = "fastpeft_config_sha256"
REPLACED_HASH_KEY = "fastpeft_replaced_config_sha256"
TMP_PREFIX = ".fastpeft-tmp-"
SHOW = 10  # how many offending keys an error lists


@dataclass(frozen=True)
class SavedAdapter:
    """One adapter directory as read: the parsed config, the tensors (on the CPU) and the weights' metadata."""

    directory: str
    config: dict
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, CONFIG_NAME)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.directory, WEIGHTS_NAME)


@dataclass(frozen=True)
class Entry:
    """Where one file tensor lives in the model (its state-dict key once the adapter is in), and its shape/dtype."""

    model_key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def check_tensors(entries: dict[str, Entry], tensors: dict[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(entries) - set(tensors))
    unexpected = sorted(set(tensors) - set(entries))
    shapes, dtypes = [], []
    for key in sorted(set(entries) & set(tensors)):
        e, t = entries[key], tensors[key]
        if tuple(t.shape) != e.shape:
            shapes.append(f"{key}: file {tuple(t.shape)}, model {e.shape}")
        if t.dtype != e.dtype and not (t.dtype.is_floating_point and e.dtype.is_floating_point):
            dtypes.append(f"{key}: file {t.dtype}, model {e.dtype}")
    problems = [f"{label} ({len(items)}): {listed(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
                 ("dtype mismatches", dtypes)) if items]
    if problems:
        raise ValueError(f"{what}:\n  " + "\n  ".join(problems))


def listed(items: list[str]) -> str:
    more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return "; ".join(items[:SHOW]) + more


# ------------------------------------------------------------------------------------------------------ writing
def write_adapter(directory, config: dict, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save `config` (JSON) and `tensors` (safetensors, with `metadata`) as the adapter directory `directory`,
    replacing an adapter there as one step. On any error nothing in `directory` has changed."""
    directory = _directory_arg(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory {directory!r} exists and is not a directory")
    _check_savable(tensors)
    cpu = {key: value.detach().to("cpu").clone().contiguous() for key, value in tensors.items()}
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode("utf-8")
    target = os.path.realpath(directory)  # a symlinked adapter directory keeps its link; its target is swapped
    metadata = {"format": "pt", **(metadata or {}), CONFIG_HASH_KEY: _sha256(config_bytes)}
    if os.path.isfile(os.path.join(target, CONFIG_NAME)):
        with open(os.path.join(target, CONFIG_NAME), "rb") as f:
            replaced = _sha256(f.read())
        if replaced != metadata[CONFIG_HASH_KEY]:
            metadata[REPLACED_HASH_KEY] = replaced
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # a file where a folder of the path should be
        raise ValueError(f"directory must be a path whose folders are directories, got {directory!r} "
                         f"({e.filename}: {e.strerror})") from None
    _remove_stale_temporaries(parent)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=parent)
    try:
        save_file(cpu, os.path.join(tmp, WEIGHTS_NAME), metadata=metadata)
        _sort_metadata(os.path.join(tmp, WEIGHTS_NAME))
        with open(os.path.join(tmp, CONFIG_NAME), "wb") as f:
            f.write(config_bytes)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(os.path.join(tmp, name))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the adapter directory is an ordinary one
        _swap_in(tmp, target)
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new files if the swap failed, the old ones after an exchange


def _sort_metadata(path: str) -> None:
    """safetensors writes `__metadata__` in hash-map order, which differs from one save to the next, so one adapter
    saved twice gave two files; rewrite the header (in place, same length) with the metadata's keys sorted."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        sorted_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(sorted_header) <= length:  # the same JSON reordered: always, short of another writer's escaping
            f.seek(8)
            f.write(sorted_header.ljust(length))


def _swap_in(tmp: str, target: str) -> None:
    """Put the files of `tmp` at `target`: a rename when there is no target yet, else an exchange of the two."""
    try:
        os.rename(tmp, target)  # also replaces an empty directory
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
            raise
    if _link_others(tmp, target) and _exchange(tmp, target):
        return
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # one by one; REPLACED_HASH_KEY tells a torn pair on load
        os.replace(os.path.join(tmp, name), os.path.join(target, name))


def _link_others(tmp: str, target: str) -> bool:
    """Hard-link the target's other files into `tmp`, so that the exchange keeps them; False where it cannot."""
    others = [entry for entry in os.scandir(target) if entry.name not in (CONFIG_NAME, WEIGHTS_NAME)]
    if any(entry.is_dir(follow_symlinks=False) for entry in others):
        return False
    try:
        for entry in others:
            os.link(entry.path, os.path.join(tmp, entry.name), follow_symlinks=False)
    except OSError:
        return False
    return True


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not supported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"exchanging {a!r} and {b!r}: {os.strerror(code)}")


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _remove_stale_temporaries(parent: str) -> None:
    """Remove temporary directories that writers on this host left when they were killed (where we may)."""
    mine = f"{TMP_PREFIX}{socket.gethostname()}-"
    try:
        entries = list(os.scandir(parent))
    except OSError:  # e.g. a reader without permission to list the folder above the adapter
        return
    for entry in entries:
        if entry.name.startswith(mine) and entry.is_dir(follow_symlinks=False):
            pid = entry.name[len(mine):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_savable(tensors: dict[str, torch.Tensor]) -> None:
    meta = sorted(key for key, value in tensors.items() if value.is_meta)
    if meta:
        raise ValueError(f"cannot save adapter weights on the meta device (they hold no values; materialise the "
                         f"model's weights first): {listed(meta)}")
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"refusing to save non-finite adapter weights (NaN / inf; did training diverge?), which would "
                         f"replace the adapter on disk: {listed(bad)}")


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key for key, value in tensors.items()
                  if value.is_floating_point() and not bool(torch.isfinite(value).all()))


# ------------------------------------------------------------------------------------------------------ reading
def read_config(directory) -> dict:
    """The parsed adapter_config.json of `directory`; errors name the file."""
    directory = _directory_arg(directory)
    path = os.path.join(directory, CONFIG_NAME)
    _require_adapter_directory(directory)
    with open(path, "rb") as f:
        return _parse_config(f.read(), path)


def read_adapter(directory) -> SavedAdapter:
    """Both files of `directory`, read through one handle on the directory (so a save swapping a new adapter in
    meanwhile cannot hand over one file of each), checked: valid JSON, a readable safetensors file, the config the
    weights were saved with, and finite values."""
    directory = _directory_arg(directory)
    _require_adapter_directory(directory)
    _remove_stale_temporaries(os.path.dirname(os.path.realpath(directory)))
    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for attempt in range(3):  # a save may remove the directory we opened (the old adapter) before we read it
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            config_bytes = _read_at(dir_fd, CONFIG_NAME)
            weights_bytes = _read_at(dir_fd, WEIGHTS_NAME)
            break
        except FileNotFoundError as e:
            if attempt == 2:
                what = "adapter weights" if e.filename == WEIGHTS_NAME else "adapter config"
                raise FileNotFoundError(f"{what} {os.path.join(directory, e.filename)!r} do not exist") from None
        finally:
            os.close(dir_fd)
    config = _parse_config(config_bytes, config_path)
    try:
        tensors = load_safetensors(weights_bytes)
        metadata = _safetensors_metadata(weights_bytes)
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        promised = _promised_size(weights_bytes)
        sizes = f"; its header promises {promised} bytes, the file has {len(weights_bytes)}" if promised else ""
        raise ValueError(f"{weights_path} is not a readable safetensors file (corrupt or truncated?): "
                         f"{e}{sizes}") from e
    config_hash = _sha256(config_bytes)
    if metadata.get(REPLACED_HASH_KEY) == config_hash != metadata.get(CONFIG_HASH_KEY):
        raise ValueError(f"{config_path} is the config that {weights_path} replaced, not its own: a save into this "
                         "directory was interrupted between its two files; save the adapter again")
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"{weights_path} holds non-finite values (NaN / inf): {listed(bad)}")
    return SavedAdapter(directory, config, tensors, metadata)


def _directory_arg(directory) -> str:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not isinstance(directory, str) or not directory.strip():
        raise ValueError(f"directory must be a non-empty path, got {directory!r}")
    return directory


def _require_adapter_directory(directory: str) -> None:
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not a saved adapter directory")


def _read_at(dir_fd: int, name: str) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file", name) from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _parse_config(data: bytes, path: str):
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _promised_size(data: bytes) -> int | None:
    """The length a safetensors buffer's header promises (8 + header + the data its offsets reach); None where the
    header itself is unreadable."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        entries = json.loads(data[8:8 + length])
        return 8 + length + max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer (its header: a little-endian u64 length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__") or {}
