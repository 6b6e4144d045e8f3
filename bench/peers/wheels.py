"""The peers' wheels for the GPU machine: download the official ones, repack two, list all.

    python3 bench/peers/wheels.py            # -> .whl/peers/ (gitignored) + MANIFEST.json

Downloads each wheel of `WHEELS` (Python 3.12, x86_64 Linux, --no-deps) into a cache outside
the repo and checks its sha256 against the one pinned here (the file these scripts were
tested with). Two official wheels are too large to carry (the device takes at most 64 MiB a
call, everything included), so they are repacked, by removing only files that the import and
training path never load, and the RECORD lists only what is left; every other file keeps its
bytes:

- unsloth: `studio/` (its web app, 82 MB unpacked; `import unsloth` never imports it);
- bitsandbytes: the native libraries for CUDA versions other than the machine's (13.0, from
  torch.version.cuda: bitsandbytes/cextension.py loads only libbitsandbytes_cuda130.so), for
  ROCm and for Intel XPU. The CPU library stays.

Repacking is reproducible: entries keep their order, names, dates and attributes. The script
prints and writes (.whl/peers/MANIFEST.json) the sha256 of every official and repacked
wheel and what was removed; run.sh checks the files it installs against that manifest.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEST = ROOT / ".whl" / "peers"
CACHE = Path.home() / ".cache" / "stackpatch" / "peers-wheels"
CUDA = "130"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux1_x86_64",
)


def drop_studio(name: str) -> bool:
    return name.startswith("studio/")


def drop_other_native_libraries(name: str, cuda: str = CUDA) -> bool:
    """True for bitsandbytes' native libraries this machine never loads."""
    folder, _, file = name.rpartition("/")
    native = file.startswith("libbitsandbytes_") and file.endswith(".so")
    if folder != "bitsandbytes" or not native:
        return False
    return file not in ("libbitsandbytes_cpu.so", f"libbitsandbytes_cuda{cuda}.so")


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str  # of the official wheel
    peers: tuple[str, ...]
    drop: Callable[[str], bool] | None = None


WHEELS = (
    Wheel(
        "unsloth",
        "2026.10.9",
        "feb40b99bc4f8c543a36cbd0fe6e1410d6e4ac16bd4d0c731f607adce3d63bb0",
        ("unsloth",),
        drop_studio,
    ),
    Wheel(
        "unsloth_zoo",
        "2026.10.9",
        "f68e0576b0e9bd2ef85f19bf665132c576b52ee4df923fbb16c81538a3cde676",
        ("unsloth",),
    ),
    Wheel(
        "trl",
        "1.15.0",
        "9c9a4b68a184a0b6425293e9b152950f817af686f3758f70191fff4ded1391c7",
        ("unsloth",),
    ),
    Wheel(
        "datasets",
        "4.8.5",
        "5079900781719c0e063a8efdd2cd95a31ad0c63209178669cd23cf1b926149ff",
        ("unsloth",),
    ),
    Wheel(
        "dill",
        "0.4.1",
        "1e1ce33e978ae97fcfcff5638477032b801c46c7c65cf717f95fbc2248f79a9d",
        ("unsloth",),
    ),
    Wheel(
        "multiprocess",
        "0.70.19",
        "3a56c0e85dd5025161bac5ce138dcac1e49174c7d8e74596537e729fd5c53c28",
        ("unsloth",),
    ),
    Wheel(
        "bitsandbytes",
        "0.50.2",
        "55348a9a4a21bfd99cf8c7b32fe67b4030ae5c2a05738e03c1747f65fa6ec283",
        ("unsloth", "experts4bit-qlora", "stackpatch"),
        drop_other_native_libraries,
    ),
    Wheel(
        "experts4bit-qlora",
        "0.58.1",
        "325fd8727b8191c8e53e45d0bc322720a090d2c5a780fa2f34e7681a9760000a",
        ("experts4bit-qlora",),
    ),
    Wheel(
        "grouped-nf4-gemm",
        "0.51.0",
        "1bf4906dea6e577e60afb434a9431f9750a8ed47e920c9f0e48471b732586d8d",
        ("experts4bit-qlora",),
    ),
    Wheel(
        "libcst",
        "1.9.0",
        "8d731abe1307720ea1a52d447555e8443a6d130e0e520243c0634a58f6edbc9d",
        ("stackpatch",),  # stackpatch's own CLI (apply_patches.py), if the machine lacks it
    ),
    Wheel(
        "axolotl",
        "0.21.0",
        "5db0468897d1f3a80fa2becc80dd4409f378ce887dcb2c98854dc70b38196391",
        ("axolotl",),
    ),
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_name(archive: zipfile.ZipFile) -> str:
    names = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    if len(names) != 1:
        raise ValueError(f"{archive.filename}: {len(names)} RECORD files, expected one")
    return names[0]


def record_line_path(line: str) -> str:
    """The path of one RECORD line (paths with commas are quoted, csv style)."""
    import csv

    return next(csv.reader([line]))[0]


def repack(source: Path, target: Path, drop: Callable[[str], bool]) -> list[str]:
    """Copy `source` to `target` without the entries `drop` selects; returns them.

    Kept entries keep their bytes, order, dates and attributes; RECORD loses the lines of the
    removed files and nothing else. The result is written atomically.
    """
    removed = []
    with zipfile.ZipFile(source) as archive:
        record = record_name(archive)
        descriptor, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(descriptor)
        try:
            with zipfile.ZipFile(scratch, "w") as out:
                for info in archive.infolist():
                    if drop(info.filename):
                        removed.append(info.filename)
                        continue
                    data = archive.read(info)
                    if info.filename == record:
                        lines = data.decode().splitlines(keepends=True)
                        data = "".join(
                            line
                            for line in lines
                            if not line.strip() or not drop(record_line_path(line))
                        ).encode()
                    out.writestr(_copy_info(info), data, compress_type=info.compress_type)
            os.chmod(scratch, 0o644)  # mkstemp makes it 0600
            os.replace(scratch, target)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise
    return removed


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    copy.compress_type = info.compress_type
    copy.external_attr = info.external_attr
    copy.create_system = info.create_system
    copy.comment = info.comment
    return copy


def verify_record(wheel: Path) -> None:
    """Every file in the wheel is in RECORD with its hash and size, and nothing else is."""
    with zipfile.ZipFile(wheel) as archive:
        record = record_name(archive)
        listed = {}
        for line in archive.read(record).decode().splitlines():
            if not line.strip():
                continue
            import csv

            path, digest, size = next(csv.reader([line]))
            listed[path] = (digest, size)
        names = [n for n in archive.namelist() if not n.endswith("/")]
        if set(names) != set(listed):
            extra = sorted(set(names) ^ set(listed))[:5]
            raise ValueError(f"{wheel.name}: RECORD and the archive disagree on {extra}")
        for name in names:
            if name == record:
                continue
            data = archive.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            if listed[name] != (f"sha256={digest.decode()}", str(len(data))):
                raise ValueError(f"{wheel.name}: {name} does not match its RECORD line")


def download(wheel: Wheel, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    stem = wheel.name.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{wheel.version}-*.whl"))
    if not found:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
            "-d",
            str(cache),
            f"{wheel.name}=={wheel.version}",
        ]
        subprocess.run(command, check=True)
        found = sorted(cache.glob(f"{stem}-{wheel.version}-*.whl"))
    if len(found) != 1:
        raise RuntimeError(f"{wheel.name} {wheel.version}: {len(found)} wheels in {cache}")
    actual = sha256_file(found[0])
    if actual != wheel.sha256:
        raise RuntimeError(
            f"{found[0].name}: sha256 {actual}, not the {wheel.sha256} these scripts were "
            "tested with"
        )
    return found[0]


def build(dest: Path, cache: Path) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    entries = []
    for wheel in WHEELS:
        official = download(wheel, cache)
        target = dest / official.name
        removed: list[str] = []
        if wheel.drop is None:
            if not target.is_file() or sha256_file(target) != wheel.sha256:
                data = official.read_bytes()
                scratch = target.with_name(f".{target.name}.tmp")
                scratch.write_bytes(data)
                os.replace(scratch, target)
        else:
            removed = repack(official, target, wheel.drop)
            verify_record(target)
        entries.append(
            {
                "name": wheel.name,
                "version": wheel.version,
                "file": target.name,
                "peers": list(wheel.peers),
                "official_sha256": wheel.sha256,
                "official_bytes": official.stat().st_size,
                "sha256": sha256_file(target),
                "bytes": target.stat().st_size,
                "repacked": wheel.drop is not None,
                "removed_files": len(removed),
                "removed": summarize_removed(removed),
            }
        )
    stale = {p.name for p in dest.glob("*.whl")} - {e["file"] for e in entries}
    for name in sorted(stale):
        (dest / name).unlink()
    manifest = {"cuda": CUDA, "wheels": entries}
    text = json.dumps(manifest, indent=1) + "\n"
    scratch = dest / ".MANIFEST.json.tmp"
    scratch.write_text(text)
    os.replace(scratch, dest / "MANIFEST.json")
    return manifest


def summarize_removed(removed: list[str]) -> list[str]:
    """Top folders as 'studio/ (2034 files)', single files by name."""
    folders: dict[str, int] = {}
    files = []
    for name in removed:
        head, _, rest = name.partition("/")
        if head == "bitsandbytes" or not rest:
            files.append(name)
        else:
            folders[head] = folders.get(head, 0) + 1
    return [f"{k}/ ({v} files)" for k, v in sorted(folders.items())] + sorted(files)


def print_manifest(manifest: dict) -> None:
    total = sum(e["bytes"] for e in manifest["wheels"])
    for e in manifest["wheels"]:
        line = f"{e['file']}: {e['bytes'] / 1e6:.2f} MB sha256 {e['sha256']}"
        if e["repacked"]:
            line += (
                f"\n    repacked from the official {e['official_bytes'] / 1e6:.2f} MB "
                f"sha256 {e['official_sha256']}\n    removed {e['removed_files']} files: "
                + ", ".join(e["removed"])
            )
        print(line)
    count = len(manifest["wheels"])
    print(f"total {total / 1e6:.2f} MB ({total / 2**20:.2f} MiB) in {count} wheels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    try:
        manifest = build(args.dest, args.cache)
    except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_manifest(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
