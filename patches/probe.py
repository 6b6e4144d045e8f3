"""Report an interpreter's installed distributions as JSON, without importing them.

Runs inside the target interpreter (`python probe.py NAME...`), so it uses the standard
library only and stays compatible with Python 3.9.
"""

import importlib.metadata
import json
import sys
import sysconfig


def probe(names, path=None):
    search = [path] if path else sys.path
    distributions = {}
    for name in names:
        found = next(iter(importlib.metadata.distributions(name=name, path=search)), None)
        if found is not None:
            distributions[name] = {
                "version": found.version,
                "location": str(found.locate_file("")),
            }
    return {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "purelib": path or sysconfig.get_paths()["purelib"],
        "distributions": distributions,
    }


def main(argv):
    path = None
    if argv[:1] == ["--path"]:
        path, argv = argv[1], argv[2:]
    json.dump(probe(argv, path), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
