"""Run the course lessons (`nbs/course/*.ipynb`) top to bottom at full size and report each one's wall time.

    python tools/run_course.py                 # every lesson, outputs stored in the notebooks (then nbdev_clean)
    python tools/run_course.py 03 05           # lessons whose file name starts with 03 or 05
    python tools/run_course.py --no-save       # run without touching the notebooks (a check)
    python tools/run_course.py --small         # the reduced size that `nbdev_test` uses (IN_TEST=1)
    python tools/run_course.py nbs/04_learner.ipynb   # any notebook by its path (the library's too), same timing and storing

Exits with 1 if a lesson fails, or takes longer than --limit minutes (10 by default: the course's promise for a
2-core CPU).
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
COURSE = ROOT / "nbs" / "course"


def run_lesson(path: Path, save: bool, timeout: int) -> float:
    "Execute one notebook in its own folder; return the wall time in seconds (raises if a cell fails)."
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()
    secs = time.perf_counter() - t0
    if save:
        nbformat.write(nb, path)
        subprocess.run(["nbdev_clean", "--fname", str(path)], check=True, cwd=ROOT)
    return secs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("lessons", nargs="*", help="file-name prefixes of lessons, or paths of notebooks, to run (default: every lesson)")
    p.add_argument("--no-save", action="store_true", help="do not write the outputs back into the notebooks")
    p.add_argument("--small", action="store_true", help="run at the reduced size nbdev_test uses (sets IN_TEST=1)")
    p.add_argument("--limit", type=float, default=10.0, help="minutes a lesson may take (default: 10)")
    a = p.parse_args(argv)
    if a.small: os.environ["IN_TEST"] = "1"
    else: os.environ.pop("IN_TEST", None)                # the kernel inherits this environment
    paths = [Path(x).resolve() for x in a.lessons if x.endswith(".ipynb")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no such notebook: {', '.join(missing)}", file=sys.stderr); return 2
    prefixes = [x for x in a.lessons if not x.endswith(".ipynb")]
    lessons = paths + sorted(f for f in COURSE.glob("*.ipynb") if (not a.lessons or any(f.name.startswith(x) for x in prefixes)) and not (paths and not prefixes))
    if not lessons:
        print(f"no lesson in {COURSE} matches {a.lessons}", file=sys.stderr); return 2
    failed, total = [], 0.0
    for f in lessons:
        print(f"{f.name} ...", end=" ", flush=True)
        try: secs = run_lesson(f, save=not a.no_save, timeout=int(a.limit * 60 * 2))
        except Exception as e:                                 # a failing cell: name it and go on with the next lesson
            print(f"FAILED: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
            failed.append(f.name); continue
        total += secs
        over = secs > a.limit * 60
        print(f"{secs / 60:.1f} min" + ("  (over the limit)" if over else ""), flush=True)
        if over: failed.append(f.name)
    print(f"{len(lessons)} lessons, {total / 60:.1f} min in all" + (f"; failed or too slow: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
