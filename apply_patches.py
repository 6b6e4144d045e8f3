#!/usr/bin/env python3
"""stackpatch command line: `python apply_patches.py --check | --apply | --verify | --revert`."""

import sys

from patches.entry import launch

if __name__ == "__main__":
    sys.exit(launch("patches.cli"))
