"""The code-shape numbers of issue 26, measured from the checkout (nothing hard-coded).

    python -m tools.design_metrics [--label=after] [--no-trace]

Static (``ast`` over ``ewc_jax/`` and ``experiments/``):
  * module sizes (lines), and the modules over ``MAX_MODULE_LINES``;
  * the longest functions, and those over ``MAX_FUNCTION_LINES`` lines without a docstring;
  * signatures with more than ``MAX_POSITIONAL`` positional parameters (``self``/``cls`` not
    counted);
  * the import graph between the project's modules (every ``import``, at module level or
    inside a function; ``if TYPE_CHECKING:`` blocks left out): its cycles (strongly connected
    components), its upward imports (``ewc_jax`` importing ``experiments``/``benchmarks``/
    ``tests``/``tools``; ``experiments`` importing ``benchmarks``/``tests``/``tools``; the pure
    core of ``ewc_jax`` importing the runner, :data:`RUNNER`) and the
    number of imports written inside functions;
  * the modules naming ``lam`` (a name, an attribute or a keyword).

Dynamic (``--no-trace`` skips it): a real ``--algo=ewc`` Split MNIST run on the prepared MNIST
(``--steps_per_task=1``, no compilation cache, so every program is traced) under
``sys.setprofile``, from ``experiments.split_mnist.main`` to the first call of the penalty (a
function of ``ewc_jax/penalty.py`` named in ``PENALTY_FUNCTIONS``, reached while the train step
is traced). The *current module* is the module of the innermost project frame (``ewc_jax.*`` or
``experiments.*``); a *stop* is a change of it; a *return* is a stop caused by a return (to a
module on the stack); ``modules`` is the number of distinct modules entered; ``stack`` the
project modules on the call stack at the penalty (outermost first, consecutive repeats merged).

The *lam trail* follows λ alone through the same run (given as ``--lam=LAM_MARK``): the calls
of project functions that are handed λ, in the order they are made: an argument equal to
``LAM_MARK`` (or a string naming it: the command line), or one holding it within three levels
of dataclass fields, NamedTuple fields (a ``lam`` field: ``Hyper``, whose λ is a tracer while
the train step is traced), mappings and sequences. Its ``modules`` are the distinct modules of
those calls; a *stop* a change of module between consecutive ones; a *return* a stop into a
module the trail had already left.

Writes ``tools/results/design_metrics_<label>.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ewc_jax", "experiments")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_POSITIONAL = 6
PENALTY_FUNCTIONS = ("ewc_loss", "ewc_penalty", "merged_distance", "weighted_distance",
                     "seed_parity_loss", "clarena_loss")
LAM_MARK = 1234.5   # the λ of the traced run: a value no default or computation produces
UPWARD = {"ewc_jax": ("experiments", "benchmarks", "tests", "tools"),
          "experiments": ("benchmarks", "tests", "tools")}
# The runner's modules: the pure core (every other module of ewc_jax) must not import them.
RUNNER = ("ewc_jax.continual", "ewc_jax.checkpoint", "ewc_jax.checkpoint_format")


def _is_runner(name: str) -> bool:
  return any(name == r or name.startswith(r + ".") for r in RUNNER)


def _upward(name: str, target: str) -> bool:
  """Whether ``name`` importing ``target`` goes up a layer (see :data:`UPWARD`, :data:`RUNNER`)."""
  if target.split(".")[0] in UPWARD.get(name.split(".")[0], ()):
    return True
  return name.startswith("ewc_jax") and not _is_runner(name) and _is_runner(target)


def module_files() -> dict[str, Path]:
  """``{dotted module name: path}`` of every ``.py`` file of the project's packages."""
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _functions(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def _positional(fn: ast.FunctionDef) -> int:
  names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
  if names and names[0] in ("self", "cls"):
    names = names[1:]
  return len(names)


def _type_checking_lines(tree: ast.AST) -> set[int]:
  lines = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      for sub in node.body:
        lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
  return lines


def _imports(name: str, tree: ast.AST, modules: set[str]) -> list[tuple[str, bool]]:
  """``(imported project module, inside a function)`` of every import of module ``name``."""
  skip = _type_checking_lines(tree)
  inside = set()
  for fn in _functions(tree):
    inside.update(range(fn.lineno, (fn.end_lineno or fn.lineno) + 1))
  package = name if (ROOT / name.replace(".", "/")).is_dir() else name.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
      continue
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    else:
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    for target in targets:
      while target and target not in modules and target.split(".")[0] in PACKAGES + (
          "benchmarks", "tests", "tools"):
        if target.split(".")[0] not in PACKAGES:
          break
        target = target.rpartition(".")[0]
      top = target.split(".")[0]
      if target in modules or top in ("benchmarks", "tests", "tools"):
        if target != name:
          out.append((target, node.lineno in inside))
  return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(10000)
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def _names_lam(source: str) -> bool:
  tokens = tokenize.generate_tokens(io.StringIO(source).readline)
  return any(t.type == tokenize.NAME and t.string == "lam" for t in tokens)


def static_metrics() -> dict:
  """Every static number of the module docstring."""
  files = module_files()
  names = set(files)
  sizes, functions, positional, graph, upward, inner, lam = {}, [], [], {}, {}, 0, []
  most_positional = 0
  for name, path in files.items():
    source = path.read_text()
    tree = ast.parse(source)
    sizes[name] = len(source.splitlines())
    for fn in _functions(tree):
      length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
      where = f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}"
      functions.append({"where": where, "lines": length,
                        "docstring": ast.get_docstring(fn) is not None})
      most_positional = max(most_positional, _positional(fn))
      if _positional(fn) > MAX_POSITIONAL:
        positional.append({"where": where, "positional": _positional(fn)})
    imports = _imports(name, tree, names)
    graph[name] = {target for target, _ in imports if target in names}
    inner += sum(1 for _, in_fn in imports if in_fn)
    upward[name] = sorted({t for t, _ in imports if _upward(name, t)})
    if _names_lam(source):
      lam.append(name)
  upward = {n: v for n, v in upward.items() if v}
  functions.sort(key=lambda f: -f["lines"])
  positional.sort(key=lambda f: -f["positional"])
  return {
      "modules": len(sizes),
      "lines_total": sum(sizes.values()),
      "largest_modules": sorted(sizes.items(), key=lambda kv: -kv[1])[:10],
      "modules_over_max": sorted(n for n, s in sizes.items() if s > MAX_MODULE_LINES),
      "longest_functions": functions[:10],
      "long_functions_without_docstring": [
          f for f in functions if f["lines"] > MAX_FUNCTION_LINES and not f["docstring"]],
      "max_positional": most_positional,
      "signatures_over_max_positional": positional,
      "import_cycles": _cycles(graph),
      "upward_imports": upward,
      "imports_inside_functions": inner,
      "modules_naming_lam": sorted(lam),
  }


def trace(data_dir: str | None) -> dict:
  """The dynamic numbers: a tiny real ``--algo=ewc`` run in a child process (see the module
  docstring)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "trace.json"
    argv = ["--algo=ewc", f"--workdir={tmp}/run", "--compile_cache=false", f"--lam={LAM_MARK}",
            "--steps_per_task=1"]
    if data_dir:
      argv.append(f"--data_dir={data_dir}")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tools import design_metrics as d; " \
           f"d._trace_child({str(out)!r}, {argv!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=900,
                   env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    return json.loads(out.read_text())


def _project(frame) -> str | None:
  name = frame.f_globals.get("__name__", "")
  return name if name.split(".")[0] in PACKAGES else None


def _trace_child(out: str, argv: list[str]) -> None:
  """Runs in the child: the run under ``sys.setprofile`` until the penalty's first call."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  from experiments import split_mnist  # pylint: disable=import-outside-toplevel
  flags.FLAGS(["split_mnist"] + argv)
  penalty_file = str(ROOT / "ewc_jax" / "penalty.py")
  state = {"current": None, "stops": [], "done": None}
  lam_calls: list[tuple[str, str]] = []

  def innermost(frame):
    while frame is not None:
      name = _project(frame)
      if name is not None:
        return name, frame
      frame = frame.f_back
    return None, None

  def profile(frame, event, arg):
    del arg
    if state["done"] is not None or event not in ("call", "return"):
      return
    if event == "call" and frame.f_code.co_filename == penalty_file and (
        frame.f_code.co_name in PENALTY_FUNCTIONS):
      lam_calls.append((_project(frame), frame.f_code.co_name))  # the trail's end (λ: a tracer)
      stack, f = [], frame
      while f is not None:
        name = _project(f)
        if name is not None and (not stack or stack[-1] != name):
          stack.append(name)
        f = f.f_back
      state["done"] = {"stack": stack[::-1], "function": frame.f_code.co_name}
      sys.setprofile(None)
      return
    if event == "call":
      name = _project(frame)
      if name is not None and _handed_lam(frame):
        lam_calls.append((name, frame.f_code.co_name))
    if event == "return":
      frame = frame.f_back
    module, _ = innermost(frame)
    if module is not None and module != state["current"]:
      state["stops"].append((module, event == "return"))
      state["current"] = module

  sys.setprofile(profile)
  try:
    split_mnist.main(["split_mnist"])
  except SystemExit:
    pass
  finally:
    sys.setprofile(None)
  if state["done"] is None:
    raise SystemExit("the penalty was never called: nothing to report")
  stops = state["stops"]
  seen, again = set(), 0
  for module, _ in stops:
    again += module in seen
    seen.add(module)
  pairs: dict[str, int] = {}
  for (a, _), (b, back) in zip(stops, stops[1:]):
    key = f"{a} {'<-' if back else '->'} {b}"
    pairs[key] = pairs.get(key, 0) + 1
  Path(out).write_text(json.dumps({
      "lam_trail": _trail(lam_calls),
      "penalty_function": state["done"]["function"],
      "transitions": dict(sorted(pairs.items(), key=lambda kv: -kv[1])),
      "stops": len(stops), "returns": sum(r for _, r in stops),
      "stops_to_a_module_already_left": again, "modules": len(seen),
      "modules_entered": sorted(seen), "stack": state["done"]["stack"],
      "stack_modules": len(set(state["done"]["stack"]))}, indent=1))


def _carries_lam(value, depth: int = 3) -> bool:
  """Whether ``value`` is or holds the traced λ (:data:`LAM_MARK`; see the module docstring)."""
  if isinstance(value, bool) or isinstance(value, type):
    return False
  if isinstance(value, (int, float)) or type(value).__module__ == "numpy" and not hasattr(
      value, "__len__"):
    try:
      return float(value) == LAM_MARK
    except (TypeError, ValueError):
      return False
  if isinstance(value, str):
    return str(LAM_MARK) in value
  if depth == 0:
    return False
  if isinstance(value, tuple) and hasattr(value, "_fields"):
    return "lam" in value._fields or any(_carries_lam(v, depth - 1) for v in value)
  if dataclasses.is_dataclass(value):
    return any(_carries_lam(getattr(value, f.name, None), depth - 1)
               for f in dataclasses.fields(value))
  if isinstance(value, dict):
    return "lam" in value or any(_carries_lam(v, depth - 1) for v in list(value.values())[:50])
  if isinstance(value, (list, tuple)):
    return any(_carries_lam(v, depth - 1) for v in value[:50])
  return False


def _handed_lam(frame) -> bool:
  """Whether the call that made ``frame`` was handed λ (in any argument, ``self`` included:
  a method of a config holding λ)."""
  code = frame.f_code
  n = code.co_argcount + code.co_kwonlyargcount
  n += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)  # *args, **kwargs
  local = frame.f_locals
  return any(_carries_lam(local.get(name)) for name in code.co_varnames[:n])


def _trail(calls: list[tuple[str, str]]) -> dict:
  """The lam trail's numbers from its calls ``(module, function)`` in order."""
  merged: list[str] = []
  for module, _ in calls:
    if not merged or merged[-1] != module:
      merged.append(module)
  returns = sum(m in merged[:i] for i, m in enumerate(merged))
  return {"modules": len(set(merged)), "stops": len(merged), "returns": returns,
          "route": merged, "calls": [f"{m}.{f}" for m, f in calls],
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--label", default="current")
  parser.add_argument("--no-trace", action="store_true")
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args()
  result = {"static": static_metrics()}
  if not args.no_trace:
    result["trace"] = trace(args.data_dir)
  path = ROOT / "tools" / "results" / f"design_metrics_{args.label}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  s = result["static"]
  print(f"modules {s['modules']}, lines {s['lines_total']}, over {MAX_MODULE_LINES} lines: "
        f"{s['modules_over_max']}")
  print(f"longest functions: {[(f['where'], f['lines']) for f in s['longest_functions'][:4]]}")
  print(f"functions > {MAX_FUNCTION_LINES} lines without docstring: "
        f"{[f['where'] for f in s['long_functions_without_docstring']]}")
  print(f"max positional {s['max_positional']}; signatures > {MAX_POSITIONAL}: "
        f"{len(s['signatures_over_max_positional'])}")
  print(f"import cycles: {s['import_cycles']}; upward: {s['upward_imports']}; imports inside "
        f"functions: {s['imports_inside_functions']}")
  print(f"modules naming lam: {len(s['modules_naming_lam'])}")
  if "trace" in result:
    t = result["trace"]
    print(f"trace to {t['penalty_function']}: {t['stops']} stops, {t['returns']} returns, "
          f"{t['stops_to_a_module_already_left']} to a module already left, {t['modules']} "
          f"modules; stack {t['stack_modules']} modules: {' > '.join(t['stack'])}")
    lt = t["lam_trail"]
    print(f"lam trail: {lt['modules']} modules, {lt['stops']} stops, {lt['returns']} returns: "
          f"{' > '.join(lt['route'])}")
  print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
  main()
