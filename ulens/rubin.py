"""`ulens rubin fetch-schemas`: fetch Rubin's alert schemas and sample packets (data, not code).

They come from the PyPI package lsst-alert-packet (GPLv3), which this MIT project neither
ships nor imports: see :mod:`schemas.rubin`. ``scripts/setup.sh`` runs this.
"""
from __future__ import annotations

import argparse

HELP = ("Fetch Rubin's alert schemas (lsst.vN_M, the supported versions) and sample packets "
        "from the PyPI package lsst-alert-packet into a cache folder.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = sub.add_parser("fetch-schemas", help="download the pinned lsst-alert-packet wheel with pip and "
                       "keep only its schema files and sample data (nothing if already there)")
    f.add_argument("--dest", metavar="DIR", default=None,
                   help="target folder (default: env ULENS_RUBIN_SCHEMAS, else "
                        "~/.cache/ulens/rubin-schemas/<version>/)")
    f.add_argument("--quiet", action="store_true", help="print only the folder")


def run(args) -> int:
    from schemas import rubin

    if args.action == "fetch-schemas":
        print(rubin.fetch(args.dest, quiet=args.quiet))
    return 0
