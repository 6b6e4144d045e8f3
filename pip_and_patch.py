#!/usr/bin/env python3
"""`python pip_and_patch.py [--python PATH] install -U transformers`: pip, then --apply."""

import sys

from patches.entry import launch

if __name__ == "__main__":
    sys.exit(
        launch(
            "patches.pip_hook",
            "run this from an environment that has them, with --python naming the one to patch",
        )
    )
