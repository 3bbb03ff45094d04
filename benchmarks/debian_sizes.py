"""Write a numeric data set the project was not built around: how much disk a Debian package takes once
installed (its `Installed-Size`, in KiB), from its name, section and one-line description, read from the
APT package index these machines carry (the same index the default data comes from, data/README.md).

    python benchmarks/debian_sizes.py OUT.csv [--index PACKAGES.lz4]

A CSV with a header `package,section,description,size`, one row per binary package that states a size.
The sizes span from a few KiB to gigabytes: a price-like target, judged by its error (evaluate.task
regression). A user rebuilds it on any Debian machine with this script.
"""

import argparse
import csv
import subprocess
from pathlib import Path

INDEX = Path("/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4")
FIELDS = {"Package": "package", "Section": "section", "Description": "description", "Installed-Size": "size"}


def stanzas(text):
    """The index's stanzas as dicts of the fields kept (a description's first line only)."""
    entry = {}
    for line in text.splitlines():
        if not line.strip():
            if entry:
                yield entry
            entry = {}
        elif not line.startswith((" ", "\t")) and ":" in line:
            key, value = line.split(":", 1)
            if key in FIELDS:
                entry[FIELDS[key]] = value.strip()
    if entry:
        yield entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--index", type=Path, default=INDEX)
    args = parser.parse_args()
    if not args.index.exists():
        raise SystemExit(f"{args.index}: no APT package index here (a Debian machine after `apt-get update` has one)")
    text = subprocess.run(["lz4cat", str(args.index)], capture_output=True, text=True, check=True).stdout
    rows = [e for e in stanzas(text) if set(FIELDS.values()) <= set(e)]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FIELDS.values()))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{args.out}: {len(rows)} packages")


if __name__ == "__main__":
    main()
