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
