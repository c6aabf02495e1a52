"""How often llama.cpp's tokenization of a GGUF export differs from dslm's: dslm's tokenizer
normalizes text with NFKC before it encodes it, llama.cpp does not.

    python bench/gguf_tokenizer.py GGUF_FOLDER [--code DIR ...] [--text FILE ...] [--json OUT]

GGUF_FOLDER: a `dslm-export --format gguf` folder. Documents:
- code: every .py file under each --code folder (default: the installed `transformers` package,
  code that a tokenizer trained on the standard library never saw), one document per file;
- text: web-like prose: each installed distribution's METADATA description (a PyPI project page:
  Markdown prose with links, names, typography), and each topic of Python's reference
  documentation (pydoc_data.topics), one document each; or the --text files.
For each kind: documents, how many NFKC changes, how many llama.cpp encodes to other ids than dslm
(the raw text through llama.cpp's tokenizer) and how many still differ when the text is
NFKC-normalized first (what dslm's GgufModel.tokenize does, and what a client can do on its side). Ids are compared without <bos>.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import subprocess
import sys
import unicodedata
from pathlib import Path
from pydoc_data.topics import topics

from dslm.data.tokens import load_text_tokenizer
from dslm_eval.gguf_model import GgufModel


def code_documents(folders: list[Path]) -> list[str]:
    return [p.read_text(errors="replace") for folder in folders for p in sorted(folder.rglob("*.py"))]


def text_documents(files: list[Path]) -> list[str]:
    if files:
        return [f.read_text(errors="replace") for f in files]
    pages = [dist.metadata.get_payload() or "" for dist in importlib.metadata.distributions()]
    return [doc for doc in [*pages, *topics.values()] if doc.strip()]


def compare(docs: list[str], dslm, llama: GgufModel) -> dict[str, int]:
    """Counts over `docs`: documents, changed by NFKC, differing ids raw, differing after NFKC."""
    counts = {"documents": len(docs), "nfkc_changes": 0, "ids_differ": 0, "ids_differ_after_nfkc": 0}
    for doc in docs:
        ours = dslm.encode(doc).ids
        normalized = unicodedata.normalize("NFKC", doc)
        counts["nfkc_changes"] += normalized != doc
        counts["ids_differ"] += llama.tokenize(doc, nfkc=False) != ours
        counts["ids_differ_after_nfkc"] += llama.tokenize(doc) != ours
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path)
    p.add_argument("--code", type=Path, nargs="*")
    p.add_argument("--text", type=Path, nargs="*", default=[])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import transformers

    code = args.code or [Path(transformers.__file__).parent]
    dslm = load_text_tokenizer(args.export / "tokenizer.json")
    config = json.loads((args.export / "config.json").read_text())
    with GgufModel(next(args.export.glob("*.gguf")), config["n_positions"], threads=2) as llama:
        result = {
            "code": compare(code_documents(code), dslm, llama),
            "text": compare(text_documents(args.text), dslm, llama),
        }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result["meta"] = {"date": datetime.date.today().isoformat(), "commit": commit, "export": str(args.export)}
    for kind in ("code", "text"):
        c = result[kind]
        print(
            f"{kind}: {c['documents']} documents, NFKC changes {c['nfkc_changes']}, ids differ {c['ids_differ']} "
            f"({c['ids_differ'] / c['documents']:.1%}), after NFKC {c['ids_differ_after_nfkc']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
