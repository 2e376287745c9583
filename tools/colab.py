"""Keep every notebook's Colab install cell and every lesson's "Open in Colab" link in step with settings.ini.

    python tools/colab.py          # rewrite what is out of step
    python tools/colab.py --check  # exit 1 and list the files that are out of step

One place says where the code lives: `git_url` and `branch` in settings.ini. A notebook opened on Colab
installs the library from there (its first code cell, which does nothing anywhere else), and each lesson,
and README's lesson table (through nbs/index.ipynb), links to the notebook's page on Colab. Publishing the
project somewhere else is a one-line change to settings.ini followed by this script.
"""
from __future__ import annotations

import argparse
import configparser
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
_PIP = re.compile(r'(%pip install -q ")([\w.-]+)(\[[\w,.-]+\])?( @ git\+)[^"]*(")')
_LINK = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")


def settings() -> dict:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return dict(cfg["DEFAULT"])


def install_command(extras: str = "", cfg: dict | None = None) -> str:
    "The pip command a notebook's first cell runs on Colab, e.g. `%pip install -q \"bigmodel_nb @ git+https://...\"`."
    cfg = cfg or settings()
    return f'%pip install -q "{cfg["lib_name"]}{extras} @ git+{cfg["git_url"]}@{cfg["branch"]}"'


def colab_url(notebook: Path, cfg: dict | None = None) -> str:
    "The notebook's page on Colab, opened from the repository at `git_url`, on `branch`."
    cfg = cfg or settings()
    repo = re.sub(r"^https://github\.com/", "", cfg["git_url"]).rstrip("/")
    return f"https://colab.research.google.com/github/{repo}/blob/{cfg['branch']}/{notebook.relative_to(ROOT).as_posix()}"


def badge(notebook: Path, cfg: dict | None = None) -> str:
    return f"[![Open In Colab]({BADGE})]({colab_url(notebook, cfg)})"


def notebooks() -> list:
    return sorted(p for p in (ROOT / "nbs").rglob("*.ipynb")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(ROOT / "nbs").parts))


def _install(src: str, cfg: dict) -> str:
    return _PIP.sub(lambda m: install_command(m.group(3) or "", cfg), src)


def _with_badge(src: str, link: str) -> str:
    "A lesson's title cell with its link on the line after the title."
    if _LINK.search(src): return _LINK.sub(lambda _: link, src, count=1)
    first, _, rest = src.partition("\n")
    return f"{first}\n\n{link}\n{rest}" if rest else f"{first}\n\n{link}\n"


def _table_links(src: str, cfg: dict) -> str:
    "README's tables (nbs/index.ipynb): each lesson of nbs/course followed by its link; other notebooks without one."
    def row(m):
        name = m.group(1)
        lesson = ROOT / "nbs" / "course" / name
        return f"| `{name}` {badge(lesson, cfg)} |" if lesson.exists() else f"| `{name}` |"
    return re.sub(r"^\| `(\w+\.ipynb)`(?: \[!\[Open In Colab\]\([^)]*\)\]\([^)]*\))? \|", row, src, flags=re.M)


def updated(path: Path, cfg: dict) -> str:
    "The notebook's JSON text as it should be."
    nb = json.loads(path.read_text(encoding="utf-8"))
    first_md = True
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        new = src
        if cell["cell_type"] == "code" and "google.colab" in src: new = _install(src, cfg)
        elif cell["cell_type"] == "markdown":
            if path.parent.name == "course" and first_md and src.startswith("# "): new = _with_badge(src, badge(path, cfg))
            if path.name == "index.ipynb": new = _table_links(new, cfg)
            first_md = False
        if new != src: cell["source"] = new.splitlines(True)
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def stale(cfg: dict | None = None) -> list:
    "The notebooks whose install cell or Colab link is out of step with settings.ini."
    cfg = cfg or settings()
    return [p for p in notebooks() if json.loads(updated(p, cfg)) != json.loads(p.read_text(encoding="utf-8"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only list the files that are out of step (exit 1 if any)")
    args = ap.parse_args(argv)
    cfg, out = settings(), stale()
    if args.check:
        for p in out: print(f"{p.relative_to(ROOT)}: Colab install cell or link out of step with settings.ini; run python tools/colab.py")
        return 1 if out else 0
    for p in out:
        p.write_text(updated(p, cfg), encoding="utf-8")
        print(f"updated {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
