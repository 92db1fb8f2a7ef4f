"""Builds the training corpus of kiln's default model from the Python 3.11 documentation.

The corpus is the reStructuredText source of the Python documentation as Debian ships it in the
`python3.11-doc` package (PSF License: openly licensed). Markup is stripped to plain prose and code.

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python3 models/default/make_corpus.py /tmp/pydoc .corpus/corpus.txt
"""

import pathlib
import re
import sys

ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
LITERAL = re.compile(r"``([^`]*)``")
LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")
EMPH = re.compile(r"\*\*?([^*\n]+)\*\*?")


def clean(text: str) -> str:
    out = []
    skip_indent = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if stripped.startswith(".. "):
            # Directives and comments; keep the body of code-ish directives only.
            if not re.match(r"\.\. (code-block|doctest|testcode|productionlist)", stripped):
                skip_indent = indent
            continue
        if stripped and set(stripped) <= set("=-*^~#+`'\"."):
            continue  # section underlines
        line = ROLE.sub(r"\1", line)
        line = LINK.sub(r"\1", line)
        line = LITERAL.sub(r"\1", line)
        line = EMPH.sub(r"\1", line)
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main():
    root = pathlib.Path(sys.argv[1])
    dest = pathlib.Path(sys.argv[2])
    sources = sorted(root.rglob("_sources/**/*.rst.txt"))
    if not sources:
        sys.exit(f"no .rst.txt sources under {root}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w") as f:
        for path in sources:
            f.write(clean(path.read_text(encoding="utf-8", errors="replace")))
            f.write("\n")
    print(f"{len(sources)} documents, {dest.stat().st_size} bytes -> {dest}")


if __name__ == "__main__":
    main()
