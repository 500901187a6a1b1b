"""Test helpers that damage checkpoints the way disks do: flipped bits inside arrays' stored
bytes (found by content, so every byte flipped is one the restore reads)."""

from pathlib import Path

import numpy as np


def _flip_in(step_folder, array: np.ndarray, bit: int) -> Path | None:
  """Flips bit ``bit`` of the byte a quarter into ``array``'s bytes where the checkpoint
  ``step_folder`` stores them raw; None when it does not (compressed, or too small)."""
  raw = np.ascontiguousarray(array).tobytes()
  offset = len(raw) // 4
  needle = raw[offset:offset + min(64, len(raw) // 2)]
  if len(needle) < 16:
    return None
  for path in sorted((Path(step_folder) / "state").rglob("*")):
    if path.is_file() and path.parent.name == "d":
      data = bytearray(path.read_bytes())
      at = data.find(needle)
      if at >= 0:
        data[at] ^= 1 << bit
        path.write_bytes(bytes(data))
        return path
  return None


def flip_bits_in_arrays(step_folder, arrays, count: int = 1, bit: int = 3) -> int:
  """Flips one bit in each of ``count`` of ``arrays`` (largest first) where the checkpoint
  ``step_folder`` stores them raw (zstd leaves incompressible float data uncompressed); returns
  ``count``, asserting that many were found."""
  done = 0
  for array in sorted((np.asarray(a) for a in arrays), key=lambda a: -a.nbytes):
    if done == count:
      break
    if array.dtype.kind == "f" and _flip_in(step_folder, array, bit) is not None:
      done += 1
  assert done == count, f"only {done} of {count} arrays are stored raw in {step_folder}"
  return done


def restored_arrays(step_folder) -> list[np.ndarray]:
  """Every array of a run checkpoint as orbax restores it (no checksum verified)."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from ewc_jax import orbax_io  # pylint: disable=import-outside-toplevel
  step_folder = Path(step_folder)
  with orbax_io.closed_loop_noise_dropped():  # a failed read's late messages: dropped
    try:
      with ocp.CheckpointManager(step_folder.parent, item_names=("state", "meta")) as mgr:
        out = mgr.restore(int(step_folder.name), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as err:
      orbax_io.wait_for_failed_reads(err, str(step_folder))
      raise
  return [np.asarray(a) for a in jax.tree.leaves(out.state)]


def silent_bit_flip(step_folder, seed: int = 0, tries: int = 300) -> str:
  """Flips one bit of the checkpoint ``step_folder``'s array data such that orbax still restores
  it, with other values: the silent case checksums must catch (a flip orbax detects itself, or
  in bytes it never reads, is undone and another drawn). Returns what was flipped."""
  import random  # pylint: disable=import-outside-toplevel
  rng = random.Random(seed)
  before = restored_arrays(step_folder)
  files = sorted(p for p in (Path(step_folder) / "state").rglob("*")
                 if p.is_file() and p.parent.name == "d")
  for _ in range(tries):
    path = rng.choice(files)
    data = bytearray(path.read_bytes())
    i, bit = rng.randrange(len(data)), rng.randrange(8)
    data[i] ^= 1 << bit
    path.write_bytes(bytes(data))
    try:
      after = restored_arrays(step_folder)
      changed = any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))
    except Exception:  # noqa: BLE001 (orbax/tensorstore saw it: not the silent case)
      changed = False
    if changed:
      return f"{path.name} byte {i} bit {bit}"
    data[i] ^= 1 << bit
    path.write_bytes(bytes(data))
  raise AssertionError(f"no silent bit flip found in {tries} tries in {step_folder}")
