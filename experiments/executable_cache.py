"""Serialised compiled programs: a warm run loads its executables instead of tracing, lowering
and compiling them again.

JAX's persistent compilation cache skips XLA's compilation, but each run still traces and
lowers every program to compute that cache's key (most of a warm run's compile time). A
:class:`Store` skips those steps too: the programs of a run are saved together
(``jax.experimental.serialize_executable``) under a key that the command line computes from
everything that determines them (:mod:`experiments.compile_cache`: the configuration, the
data's shapes, the source code, the library versions, the device and the compiler flags). The
key is the caller's promise, so this lives with the command lines: the library knows no store,
only the ``compile_fn`` hook of :func:`ewc_jax.continual.run` (:class:`Cached` is one).

Only freshly compiled programs are saved: on CPU (jaxlib 0.10) the serialisation of an
executable that JAX's persistent compilation cache loaded does not run ("Function ... not
found"), so a compile phase served by that cache saves nothing (:func:`persistent_cache_hits`).
:class:`Cached` therefore names the programs after its key (``chunk_<digest>``, through
:class:`ewc_jax.continual.programs.Uncompiled`'s ``lower``): the name is part of the lowered module and of JAX's cache key, so
programs the store lacks under a new key (e.g. after an edit of the code that leaves them as
they were) are compiled afresh and saved, not loaded from JAX's cache. Only when the store lost
an entry that JAX's cache still holds under the same key does a run load from that cache.

A saved entry that cannot be read back (truncated, written by another jaxlib) counts as
missing, and the programs are compiled as usual. A loaded executable still checks the
shapes and dtypes of its arguments at every call.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from experiments import executable_cache
    >>> store = executable_cache.Folder(tempfile.mkdtemp())
    >>> double = jax.jit(lambda x: 2 * x).lower(jnp.ones(3)).compile()
    >>> store.save("my-key", {"double": double})
    >>> store.load("my-key", ("double",))["double"](jnp.ones(3)).tolist()
    [2.0, 2.0, 2.0]
    >>> store.load("other-key", ("double",)) is None
    True
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Callable
from typing import Iterator
from typing import Mapping
from typing import NamedTuple
from typing import Protocol
from typing import Sequence

import jax
from jax.experimental import serialize_executable

from ewc_jax import continual

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


@contextlib.contextmanager
def persistent_cache_hits() -> Iterator[list]:
  """A list that collects one entry per hit of JAX's persistent compilation cache while the
  block runs (in any thread)."""
  hits: list = []

  def listener(event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
      hits.append(event)

  jax.monitoring.register_event_listener(listener)
  try:
    yield hits
  finally:
    jax.monitoring.unregister_event_listener(listener)


class Store(Protocol):
  """Where compiled programs are kept between processes."""

  def load(self, key: str, names: Sequence[str]) -> dict[str, Callable] | None:
    """The executables saved under ``key``, or ``None`` when any of ``names`` is missing."""

  def save(self, key: str, executables: Mapping[str, Callable]) -> None:
    """Saves ``executables`` (``jax.stages.Compiled``) under ``key``, replacing what was
    there; a failure to save leaves the store as it was."""


class Cached(NamedTuple):
  """A store and the key of one run's programs: a :class:`ewc_jax.continual.programs.Compiler`
  (``continual.run(..., compile_fn=Cached(store, key))``).

  Called, it loads the programs saved under ``key`` and the layout of the call (a sweep's
  config axis and mesh); else it compiles them, named after that key, and saves them unless
  JAX's persistent cache served them (:func:`persistent_cache_hits`)."""
  store: Store
  key: str

  def __call__(self, programs: continual.Uncompiled) -> Mapping[str, Callable]:
    key = f"{self.key}-{programs.layout}" if programs.layout else self.key
    loaded = self.store.load(key, programs.names)
    if loaded is not None:
      return loaded
    # Lowered outside the window: tracing runs small programs eagerly, which JAX's cache may
    # serve without that saying anything about the run's own programs.
    lowered = programs.lower(hashlib.sha256(key.encode()).hexdigest()[:16])
    with persistent_cache_hits() as hits:
      compiled = continual.compile_lowered(lowered)
    if not hits:
      self.store.save(key, compiled)
    return compiled


class Folder:
  """A :class:`Store` in a folder: one file per key, written whole then renamed into place."""

  def __init__(self, folder: str | os.PathLike):
    self.folder = Path(folder)

  def _path(self, key: str) -> Path:
    if not _KEY.match(key):
      raise ValueError(f"`key` must be 1-200 characters of letters, digits and '_.-', but got "
                       f"key={key!r}.")
    return self.folder / f"{key}.executables"

  def load(self, key: str, names: Sequence[str]) -> dict[str, Callable] | None:
    path = self._path(key)
    try:
      saved = pickle.loads(path.read_bytes())
      if not set(names) <= set(saved):
        return None
      # Deserialising runs mostly outside the GIL: two threads load the programs (~20 % less
      # time than one after another, measured for a run's seven on a 2-core CPU).
      with concurrent.futures.ThreadPoolExecutor(
          min(2, len(names)) or 1, thread_name_prefix="ewc_jax-load") as pool:
        loaded = pool.map(lambda name: serialize_executable.deserialize_and_load(*saved[name]),
                          names)
        return dict(zip(names, loaded))
    except FileNotFoundError:
      return None
    except Exception:  # pylint: disable=broad-except  (unreadable: compile as if missing)
      return None

  def save(self, key: str, executables: Mapping[str, Callable]) -> None:
    path = self._path(key)
    blob = pickle.dumps({name: serialize_executable.serialize(ex)
                         for name, ex in executables.items()})
    try:
      self.folder.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
      try:
        with os.fdopen(fd, "wb") as f:
          f.write(blob)
        os.replace(tmp, path)
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
    except OSError as e:  # a cache: the run goes on, the next one compiles again
      logging.getLogger(__name__).warning("compiled programs not saved to %s: %s", path, e)
