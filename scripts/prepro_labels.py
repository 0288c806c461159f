"""Seed-compatible name: runs `aoanet-data prepro` (the seed's underscore flags work too)."""

import sys

from aoanet.cli.data import main

if __name__ == "__main__":
    main(["prepro", *sys.argv[1:]])
