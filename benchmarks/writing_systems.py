"""Write a classification data set the project was not built around: which writing system a short
string is in (Latin, Greek, Cyrillic, Arabic, Hebrew, Devanagari, Hangul, Thai, Georgian,
Armenian), 50 strings of 3 to 7 random letters each, from Python's own Unicode database.

    python benchmarks/writing_systems.py OUT.jsonl

One JSON object per line: {"text": "...", "script": "Greek"}. Seeded: the same Python (the same
Unicode version) writes the same file.
"""

import json
import random
import sys
import unicodedata
from collections import defaultdict

SCRIPTS = {"LATIN": "Latin", "GREEK": "Greek", "CYRILLIC": "Cyrillic", "ARABIC": "Arabic", "HEBREW": "Hebrew",
           "DEVANAGARI": "Devanagari", "HANGUL": "Hangul", "THAI": "Thai", "GEORGIAN": "Georgian",
           "ARMENIAN": "Armenian"}
PER_SCRIPT = 50


def letters():
    """Letters of the Basic Multilingual Plane by writing system, from the first word of their name."""
    pools = defaultdict(list)
    for code in range(0x20, 0x10000):
        char = chr(code)
        name = unicodedata.name(char, "")
        if name and unicodedata.category(char) in ("Lu", "Ll", "Lo") and name.split()[0] in SCRIPTS:
            pools[SCRIPTS[name.split()[0]]].append(char)
    return pools


def main(out):
    rng = random.Random(7)
    rows, seen = [], set()
    for script, pool in letters().items():
        count = 0
        while count < PER_SCRIPT:
            text = "".join(rng.choice(pool) for _ in range(rng.randint(3, 7)))
            if text not in seen:
                seen.add(text)
                rows.append(dict(text=text, script=script))
                count += 1
    rng.shuffle(rows)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"{out}: {len(rows)} rows, {len(SCRIPTS)} writing systems (Unicode {unicodedata.unidata_version})")


if __name__ == "__main__":
    main(sys.argv[1])
