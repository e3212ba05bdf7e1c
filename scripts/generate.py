"""Regenerate Python code from protos/ into generated/ (or into --out for a drift check)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "generated"


def generate(out: Path) -> None:
    """Run protoc (messages, gRPC stubs, mypy-protobuf stubs) for every file under protos/."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for directory in {out / Path(s).parent for s in sources} | {out / "pulse"}:
        (directory / "__init__.py").touch()


def differences(left: Path, right: Path) -> list[str]:
    """Relative paths of files that differ between two trees (ignoring caches)."""

    def files(root: Path) -> set[str]:
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    a, b = files(left), files(right)
    changed = sorted(a ^ b)
    changed += sorted(f for f in a & b if not filecmp.cmp(left / f, right / f, shallow=False))
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    options = parser.parse_args()
    if not options.check:
        shutil.rmtree(GENERATED / "pulse", ignore_errors=True)
        generate(GENERATED)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = differences(Path(tmp) / "pulse", GENERATED / "pulse")
    if stale:
        print("generated/ is stale; run `make generate`. Differs:", *stale, sep="\n  ")
        return 1
    print("generated/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
