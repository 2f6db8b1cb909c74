"""Checkpoints that restore exactly or fail loudly: orbax's format, a manifest, atomic writes.

``save_checkpoint`` writes the state with orbax's ``StandardCheckpointer`` into a hidden sibling
directory, adds ``bnjax_manifest.json`` (every array's name, shape, dtype and SHA-256, and the
tree structure), and only then renames the directory into place: a crash at any point leaves
either the previous checkpoint at ``path`` or the new one, never a mixture (a leftover hidden
``.NAME.tmp`` directory is all a crash costs, removed by the next save to ``path``).
``restore_checkpoint`` checks the manifest against ``like`` before reading and every array's
checksum after, and raises one of three errors, all ``CheckpointError``:

- ``CheckpointNotFoundError`` (a ``FileNotFoundError``): nothing, an empty directory, or a
  directory that is not a checkpoint at ``path``;
- ``CheckpointDamagedError`` (a ``ValueError``): a file that cannot be read, or an array whose
  bytes differ from what was saved, named: ``batch_stats/bn1/mean checksum mismatch``;
- ``CheckpointMismatchError`` (a ``ValueError``): the checkpoint holds another tree, shapes or
  dtypes than ``like``; ``cast=True`` accepts other dtypes and casts them.

A checkpoint written without a manifest (bnjax before manifests) restores with a warning and
without verification. Imports orbax on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
import warnings
from typing import Any

import jax
import numpy as np

MANIFEST = "bnjax_manifest.json"
FORMAT = 1


class CheckpointError(Exception):
  """A checkpoint could not be restored exactly."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No checkpoint at the path."""


class CheckpointDamagedError(CheckpointError, ValueError):
  """The checkpoint's files are unreadable or differ from what was saved."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """The checkpoint holds another tree, shapes or dtypes than the state to restore into."""


def entry_name(path) -> str:
  """``batch_stats/bn1/mean`` for a tree path (attribute, key and index entries joined)."""
  parts = []
  for key in path:
    for attribute in ("name", "key", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _host_value(array) -> np.ndarray:
  """The whole array on this host, also where it spans several processes."""
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    if array.is_fully_replicated:
      return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def _digest(array) -> str:
  return hashlib.sha256(np.ascontiguousarray(_host_value(array)).tobytes()).hexdigest()


def _sync(name: str) -> None:
  """A barrier across processes (multi-host runs); nothing on one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def manifest_of(state: Any) -> dict[str, Any]:
  """The manifest of ``state``: its tree structure, and per array the shape, dtype and SHA-256."""
  entries = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    entries[entry_name(path)] = {
      "shape": list(np.shape(leaf)),
      "dtype": str(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype),
      "sha256": _digest(leaf),
    }
  return {"format": FORMAT, "treedef": str(jax.tree.structure(state)), "arrays": entries}


def _publish(staged: pathlib.Path, path: pathlib.Path) -> None:
  """Moves the complete ``staged`` directory to ``path``, replacing a checkpoint there.

  Each rename is atomic; between the two a crash leaves the old checkpoint at its backup name
  and ``path`` empty, which ``restore_checkpoint`` reports as not found (nothing is mixed).
  """
  if path.exists():
    backup = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
    os.replace(path, backup)
    os.replace(staged, path)
    shutil.rmtree(backup)
  else:
    os.replace(staged, path)


def save(fn: str, path: str | os.PathLike, state: Any, *, overwrite: bool) -> pathlib.Path:
  import orbax.checkpoint as ocp  # on first use: ~1 s to import, and many loops never save

  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(
      f"bnjax.{fn}: a checkpoint (or another file) is already at {path}. Hint: pass"
      " overwrite=True to replace it atomically, or save each step to its own directory."
    )
  # One staging name for every process of a multi-host run (orbax writes it together); a
  # crashed save's leftover is removed first, by the primary process.
  staged = path.with_name(f".{path.name}.tmp")
  primary = jax.process_index() == 0
  if primary:
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.tmp*"):  # ours, or orbax's own inside it
      shutil.rmtree(leftover)
  _sync(f"bnjax.save_checkpoint:stage:{path}")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(staged, state)
  manifest = manifest_of(state)  # every process takes part where arrays must be gathered
  if primary:
    with open(staged / MANIFEST, "w") as file:
      json.dump(manifest, file, indent=1)
      file.flush()
      os.fsync(file.fileno())
    _publish(staged, path)
  _sync(f"bnjax.save_checkpoint:published:{path}")
  return path


def _not_found(fn: str, path: pathlib.Path, what: str) -> CheckpointNotFoundError:
  return CheckpointNotFoundError(
    f"bnjax.{fn}: no checkpoint at {path}: {what}. Hint: pass the path save_checkpoint"
    " returned; a crash during a save leaves the previous checkpoint in place and a hidden"
    f" .{path.name}.tmp directory beside it."
  )


def _compare(fn: str, path, manifest: dict, like: Any, *, cast: bool) -> None:
  saved = manifest["arrays"]
  wanted = {entry_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(like)}
  problems = [f"{name} is missing from the checkpoint" for name in wanted if name not in saved]
  problems += [
    f"{name} is in the checkpoint but not in `like`" for name in saved if name not in wanted
  ]
  for name, leaf in wanted.items():
    if name not in saved:
      continue
    entry = saved[name]
    if tuple(entry["shape"]) != tuple(np.shape(leaf)):
      problems.append(f"{name} has shape {tuple(entry['shape'])}, `like` {tuple(np.shape(leaf))}")
    if entry["dtype"] != str(leaf.dtype) and not cast:
      problems.append(f"{name} is {entry['dtype']}, `like` {leaf.dtype} (cast=True casts)")
  if problems:
    raise CheckpointMismatchError(
      f"bnjax.{fn}: the checkpoint at {path} does not match `like`: "
      + "; ".join(problems[:8])
      + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
      + ". Hint: build `like` from the model and optimizer that wrote the checkpoint"
      " (momentum=None adds batch_stats/count; freeze() changes the optimizer state)."
    )


def restore(fn: str, path: str | os.PathLike, like: Any, *, cast: bool) -> Any:
  import orbax.checkpoint as ocp

  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise _not_found(fn, path, "nothing there")
  if not path.is_dir() or not any(path.iterdir()):
    raise _not_found(fn, path, "an empty directory" if path.is_dir() else "a file, not a directory")
  manifest_path = path / MANIFEST
  if not manifest_path.exists() and not (path / "_CHECKPOINT_METADATA").exists():
    raise _not_found(fn, path, "a directory without a checkpoint's files")
  manifest = None
  if manifest_path.exists():
    try:
      manifest = json.loads(manifest_path.read_text())
      manifest["arrays"]
    except (ValueError, KeyError, TypeError) as error:
      raise CheckpointDamagedError(
        f"bnjax.{fn}: the checkpoint at {path} is damaged: its {MANIFEST} cannot be read ({error})."
      ) from error
    _compare(fn, path, manifest, like, cast=cast)
  else:
    warnings.warn(
      f"bnjax.{fn}: the checkpoint at {path} has no {MANIFEST} (written before bnjax kept"
      " checksums); it is restored without verification. Save it again to add one.",
      UserWarning,
      stacklevel=3,
    )

  def target(path_, leaf):
    struct = ocp.utils.to_shape_dtype_struct(leaf)
    if manifest is None or not isinstance(struct, jax.ShapeDtypeStruct):
      return struct
    saved = np.dtype(manifest["arrays"][entry_name(path_)]["dtype"])
    return jax.ShapeDtypeStruct(struct.shape, saved, sharding=struct.sharding)

  targets = jax.tree_util.tree_map_with_path(target, like)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      restored = checkpointer.restore(path, targets)
    except Exception as error:
      if manifest is None and isinstance(error, ValueError):
        raise CheckpointMismatchError(
          f"bnjax.{fn}: the checkpoint at {path} does not match `like`: {error} Hint: build"
          " `like` from the model and optimizer that wrote the checkpoint."
        ) from error
      raise CheckpointDamagedError(
        f"bnjax.{fn}: the checkpoint at {path} is damaged: its files cannot be read"
        f" ({type(error).__name__}: {str(error)[:300]})."
      ) from error
  if manifest is not None:
    for path_, leaf in jax.tree_util.tree_leaves_with_path(restored):
      name = entry_name(path_)
      if _digest(leaf) != manifest["arrays"][name]["sha256"]:
        raise CheckpointDamagedError(
          f"bnjax.{fn}: the checkpoint at {path} is damaged: {name} checksum mismatch (its"
          " bytes differ from what was saved). Hint: restore an earlier checkpoint."
        )
  if cast:
    restored = jax.tree.map(lambda value, leaf: value.astype(leaf.dtype), restored, like)
  return restored
