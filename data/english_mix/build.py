"""
Build english_mix's three files from the Debian 12 packages its text comes from (SOURCE.md): the GCIDE
dictionary (dict-gcide), the reStructuredText sources of the Python 3.11 documentation (python3.11-doc) and the
POD files of the Perl 5.36 documentation (perl-doc). apt-get downloads the packages (about 35 MB) and dpkg-deb
unpacks them into a temporary folder; nothing is installed.

    python data/english_mix/build.py --out_dir /path/to/english_mix             # apt-get download, then build
    python data/english_mix/build.py --out_dir /path/to/english_mix --debs DIR  # from .deb files already at hand
    python data/english_mix/prepare.py --input /path/to/english_mix              # then tokenise, as usual

Dictionary entries are kept in the dictionary's own order and grouped into documents of at least 4,000
characters; every documentation file is one document.
"""
import argparse
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile

PACKAGES = ("dict-gcide", "python3.11-doc", "perl-doc")
DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(digits):
    """A dictd index offset or length: a number written in base 64 with DICTD_DIGITS."""
    value = 0
    for digit in digits:
        value = value * 64 + DICTD_DIGITS.index(digit)
    return value


def dictionary_documents(index_path, dict_path, least=4000):
    """The entries of a dictd dictionary (its .index and its gzip/dictzip .dict.dz) in file order, each without
    its trailing newlines, joined by blank lines into documents of at least `least` characters (the last one may
    be shorter). An entry that several headwords share is kept once."""
    with gzip.open(dict_path) as f:
        data = f.read()
    with open(index_path, encoding="utf-8", errors="replace") as f:
        spans = sorted({(dictd_number(fields[1]), dictd_number(fields[2]))
                        for fields in (line.rstrip("\n").split("\t") for line in f) if len(fields) >= 3})
    documents, entries, size = [], [], 0
    for offset, length in spans:
        entry = data[offset:offset + length].decode("utf-8", errors="replace").rstrip("\n")
        entries.append(entry)
        size += len(entry)
        if size >= least:
            documents.append("\n\n".join(entries))
            entries, size = [], 0
    if entries:
        documents.append("\n\n".join(entries))
    return documents


def file_documents(pattern):
    """One document per file matching the glob pattern, in path order, stripped; empty files are left out."""
    texts = []
    for path in sorted(glob.glob(pattern, recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read().strip())
    return [text for text in texts if text]


def write_documents(path, documents, source):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text, "source": source}) + "\n")
    print(f"wrote {path}: {len(documents):,} documents, {sum(map(len, documents)):,} characters")


def unpack(debs, root):
    """dpkg-deb -x every package of PACKAGES found in the folder `debs` into `root`."""
    for package in PACKAGES:
        found = sorted(glob.glob(os.path.join(debs, f"{package}_*.deb")))
        if not found:
            raise FileNotFoundError(f"no {package}_*.deb in {debs}")
        subprocess.run(["dpkg-deb", "-x", found[-1], root], check=True)


def build(root, out_dir):
    """The three files of english_mix from the unpacked packages under `root`."""
    os.makedirs(out_dir, exist_ok=True)
    dictd = os.path.join(root, "usr", "share", "dictd")
    parts = {"gcide": dictionary_documents(os.path.join(dictd, "gcide.index"), os.path.join(dictd, "gcide.dict.dz")),
             "python_docs": file_documents(os.path.join(root, "usr", "share", "doc", "python3.11", "html", "_sources",
                                                        "**", "*.txt")),
             "perl_docs": file_documents(os.path.join(root, "usr", "share", "perl", "*", "pod", "*.pod"))}
    for name, documents in parts.items():
        if not documents:
            raise FileNotFoundError(f"no {name} text under {root}: are the packages of the right version?")
        write_documents(os.path.join(out_dir, f"{name}.jsonl.gz"), documents, name)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="folder for gcide.jsonl.gz, python_docs.jsonl.gz, "
                                                         "perl_docs.jsonl.gz")
    parser.add_argument("--debs", help="a folder holding the three .deb files (default: apt-get download them)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as work:
            debs = args.debs
            if debs is None:
                debs = os.path.join(work, "debs")
                os.makedirs(debs)
                subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
            unpack(debs, os.path.join(work, "root"))
            build(os.path.join(work, "root"), args.out_dir)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
