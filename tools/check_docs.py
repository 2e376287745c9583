"""Run nbdev's part of the documentation build (everything before Quarto) and fail on what would break the site.

    python tools/check_docs.py                  # every notebook in nbs/
    python tools/check_docs.py nbs/04_learner.ipynb nbs/course/01_four_challenges.ipynb

For each notebook this runs the same processors `nbdev_docs` runs (`nbdev.serve_drv.main` with nbdev's
`FilterDefaults`, into `_proc/`), then checks:

- no cell that nbdev executes for the docs mixes imports with other code (nbdev runs every cell with an import
  while it renders `show_doc`, so such a cell would run its work during the build, and nbdev warns);
- processing raises nothing, and every `show_doc` cell comes out with rendered markdown;
- every public name of the module a library notebook exports is documented in it: each name in `__all__`, and each
  public method and property a class in `__all__` defines (`show_doc(Class.method)`);
- `nbs/nbdev.yml` says what `settings.ini` says (nbdev regenerates it; it must be committed in step).

Quarto itself is not run: the site is rendered by `.github/workflows/deploy.yaml` where the project is hosted.
Exits with 1 and a list of the problems if any check fails.
"""
import argparse
import ast
import importlib
import inspect
import re
import sys
import time
import warnings
from pathlib import Path

from execnb.nbio import read_nb
from nbdev.config import get_config
from nbdev.processors import FilterDefaults
from nbdev.quarto import refresh_quarto_yml
import nbdev.serve_drv

ROOT = Path(__file__).resolve().parent.parent


def _cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _shown(nb) -> set:
    "Names passed to `show_doc(...)` in a (processed) notebook, as written: `Learner`, `Learner.fit`."
    out = set()
    for c in _cells(nb):
        try: tree = ast.parse(c.source)
        except SyntaxError: continue                   # cell magics and the like
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "show_doc" and n.args:
                named = [k.value.value for k in n.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)]
                out.add(named[0] if named else ast.unparse(n.args[0]))
    return out


def _hooks(cls) -> set:
    "Methods the framework calls, not the user: a callback's event handlers, a torch module's `forward` and `extra_repr`."
    out = set()
    if any(b.__name__ == "Callback" and b.__module__.endswith(".events") for b in cls.__mro__):
        out |= set(importlib.import_module(f"{get_config().lib_name}.events").EVENTS)
    if any(b.__name__ == "Module" and b.__module__.startswith("torch.nn") for b in cls.__mro__):
        out |= {"forward", "extra_repr"}
    return out


def public_api(module) -> list:
    """What a user of `module` calls: the classes and functions in `__all__`, and the public methods and properties
    those classes define themselves (not the hooks in `_hooks`)."""
    names = []
    for nm in getattr(module, "__all__", []):
        obj = getattr(module, nm, None)
        if obj is None or getattr(obj, "__module__", module.__name__) != module.__name__: continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)): continue      # constants and type aliases
        names.append(nm)
        if not inspect.isclass(obj): continue
        hooks = _hooks(obj)
        for attr, val in vars(obj).items():
            if attr.startswith("_") or attr in hooks: continue
            if isinstance(val, (staticmethod, classmethod)): val = val.__func__
            if inspect.isfunction(val) or isinstance(val, property): names.append(f"{nm}.{attr}")
    return names


def check_notebook(src: Path, cache: Path) -> list:
    "Process one notebook as the docs build does; return its problems as lines of text."
    rel = src.relative_to(ROOT / "nbs")
    dst = cache / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    problems = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try: nbdev.serve_drv.main((src, dst, FilterDefaults))
        except Exception as e:
            cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
            return [f"{rel}: processing failed: {cause.splitlines()[0][:300]}"]
    for w in caught:
        msg = str(w.message)
        if "imports and other code" in msg:
            code = msg.split("---\n")[1].strip().splitlines() if "---\n" in msg else [msg]
            problems.append(f"{rel}: a cell mixes imports with other code (put the imports in a cell of their own): {code[0][:100]!r}")
    out = read_nb(dst)
    for c in _cells(out):
        if "show_doc(" in c.source and not c.source.lstrip().startswith("#"):
            rendered = any("text/markdown" in (o.get("data") or {}) for o in c.get("outputs", []))
            if not rendered: problems.append(f"{rel}: `{c.source.strip()[:80]}` rendered nothing")
    exp = [re.search(r"^#\|\s*default_exp\s+(\S+)", c.source, re.M) for c in _cells(read_nb(src))]
    mod_name = next((m.group(1) for m in exp if m), None)
    if mod_name:
        module = importlib.import_module(f"{get_config().lib_name}.{mod_name}")
        shown = _shown(out)
        missing = [nm for nm in public_api(module) if nm not in shown]
        if missing: problems.append(f"{rel}: no show_doc for {len(missing)} public names: {', '.join(missing)}")
        nodoc = [nm for nm in public_api(module) if not inspect.getdoc(_resolve(module, nm))]
        if nodoc: problems.append(f"{rel}: no docstring for {', '.join(nodoc)}")
    return problems


def _resolve(module, dotted):
    obj = module
    for part in dotted.split("."):
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
    if isinstance(obj, (staticmethod, classmethod)): obj = obj.__func__
    return obj


def check_nbdev_yml() -> list:
    "nbdev writes nbs/nbdev.yml from settings.ini; a difference means the committed one is stale."
    yml = ROOT / "nbs" / "nbdev.yml"
    before = yml.read_text()
    refresh_quarto_yml()
    after = yml.read_text()
    if before != after:
        yml.write_text(before)
        return ["nbs/nbdev.yml is not what settings.ini gives: run `python -c 'from nbdev.quarto import refresh_quarto_yml as r; r()'` and commit it"]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="*", help="notebooks to check (default: every notebook under nbs/)")
    a = p.parse_args(argv)
    nbs = [Path(x).resolve() for x in a.notebooks] or sorted((ROOT / "nbs").rglob("*.ipynb"))
    nbs = [f for f in nbs if not any(part.startswith((".", "_")) for part in f.relative_to(ROOT / "nbs").parts)]
    cache = ROOT / "_proc"
    problems = check_nbdev_yml()
    t0 = time.perf_counter()
    for f in nbs:
        t = time.perf_counter()
        found = check_notebook(f, cache)
        print(f"{f.relative_to(ROOT)}: {'ok' if not found else f'{len(found)} problem(s)'} ({time.perf_counter() - t:.0f} s)", flush=True)
        problems += found
    print(f"{len(nbs)} notebooks processed in {time.perf_counter() - t0:.0f} s")
    if problems:
        print("\nThe documentation build would break or be incomplete:", *problems, sep="\n- ", file=sys.stderr)
        return 1
    print("docs check passed: every notebook processes, every show_doc renders, the public API is documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
