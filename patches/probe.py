"""Report an interpreter's installed distributions as JSON, without importing them.

Runs inside the target interpreter (`python probe.py NAME...`), so it uses the standard
library only and stays compatible with Python 3.9.
"""

import json
import os
import re
import sys
import sysconfig


def _normalized(name):
    # importlib.metadata's: PEP 503 normalization, with underscores.
    return re.sub(r"[-_.]+", "_", name).lower()


def _version(info):
    """The Version header of a .dist-info or .egg-info folder (or an egg-info file)."""
    sources = [info] if os.path.isfile(info) else [f"{info}/METADATA", f"{info}/PKG-INFO"]
    for source in sources:
        try:
            with open(source, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if not line.strip():
                        break  # the headers end at the first blank line
                    if line.startswith("Version:"):
                        return line[len("Version:") :].strip()
        except OSError:
            continue
    return None


def _scan(names, search):
    """Each name's first .dist-info/.egg-info on the search path, as importlib.metadata finds
    it, read without importing importlib.metadata (and the email package it loads: the
    larger part of a quick --verify's imports). Names not found here are left to it."""
    wanted = {}
    for name in names:
        wanted.setdefault(_normalized(name), []).append(name)
    found = {}
    for entry in search:
        root = entry or "."
        try:
            children = os.listdir(root)
        except OSError:  # missing, or a zip file: importlib.metadata looks there
            continue
        for child in children:
            low = child.lower()
            if not low.endswith((".dist-info", ".egg-info")):
                continue
            spellings = wanted.get(_normalized(low.rpartition(".")[0].partition("-")[0]), [])
            if not spellings or spellings[0] in found:
                continue
            info = os.path.join(root, child)
            version = _version(info)
            if version is not None:
                for name in spellings:
                    found[name] = {"version": version, "location": os.path.dirname(info)}
    return found


def probe(names, path=None):
    search = [path] if path else sys.path
    distributions = _scan(names, search)
    missing = [name for name in names if name not in distributions]
    if missing:
        import importlib.metadata

        for name in missing:
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
