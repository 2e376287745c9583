"""Write README.md from nbs/index.ipynb, without Quarto.

    python tools/make_readme.py          # write README.md
    python tools/make_readme.py --check  # exit 1 if README.md is out of date

Markdown cells are copied as they are. Code cells become ```python blocks followed by their stored
outputs. Cell directives are honoured the way nbdev's docs honour them:
`#| hide` and `#| include: false` drop the cell, `#| echo: false` drops the code but keeps the
outputs, `#| output: false` keeps the code but drops the outputs. Directive lines never appear in
the README. Images and widgets in outputs are left out (a README cannot show them).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "nbs" / "index.ipynb"
README = ROOT / "README.md"
HEADER = "<!-- This file is generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n"

_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*(.*?)\s*$")


def directives(source: str) -> tuple[dict, str]:
    "Split a code cell into its `#|` directives (name -> value) and the remaining code."
    found, rest, header = {}, [], True
    for line in source.splitlines():
        m = _DIRECTIVE.match(line)
        if header and m:
            name, _, value = m.group(1).partition(":")
            words = name.split()
            if not words: continue
            key = words[0].lower()
            found[key] = value.strip().lower() if value else " ".join(words[1:]).lower() or "true"
            continue
        if header and not line.strip(): continue
        header = False
        rest.append(line)
    return found, "\n".join(rest).rstrip()


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def render_output(out: dict) -> str | None:
    "One stored output as Markdown, or None when it has nothing a README can show."
    kind = out.get("output_type")
    if kind == "stream":
        if out.get("name") == "stderr": return None
        text = _text(out.get("text", "")).rstrip()
        return f"```\n{text}\n```" if text else None
    if kind in ("execute_result", "display_data"):
        data = out.get("data", {})
        if "text/markdown" in data: return _text(data["text/markdown"]).strip()
        if "application/vnd.jupyter.widget-view+json" in data or "image/png" in data: return None
        if "text/plain" in data:
            return f"```\n{_text(data['text/plain']).rstrip()}\n```"
    if kind == "error":
        raise SystemExit(f"{NOTEBOOK}: a code cell stored an error ({out.get('ename')}): run the notebook again before building the README")
    return None


def build(nb: dict) -> str:
    "The README text for notebook `nb`."
    parts = []
    for cell in nb["cells"]:
        source = _text(cell.get("source", ""))
        if cell["cell_type"] == "markdown":
            if source.strip(): parts.append(source.strip())
            continue
        if cell["cell_type"] != "code": continue
        flags, code = directives(source)
        if "hide" in flags or flags.get("include") == "false": continue
        if code and flags.get("echo") != "false": parts.append(f"```python\n{code}\n```")
        if flags.get("output") != "false":
            parts.extend(r for r in map(render_output, cell.get("outputs", [])) if r)
    return HEADER + "\n" + "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = ap.parse_args(argv)
    text = build(json.loads(NOTEBOOK.read_text(encoding="utf-8")))
    if args.check:
        current = README.read_text(encoding="utf-8") if README.exists() else ""
        if current != text:
            print(f"{README.name} is out of date with {NOTEBOOK.relative_to(ROOT)}: run `python tools/make_readme.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
