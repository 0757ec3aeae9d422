"""Regenerate deepinfer_nb/_proto/ from protos/*.proto (`make proto`); `--check` fails if stale.

grpc_tools writes absolute imports (`import engine_service_pb2`); they are rewritten to
package-relative ones so the generated modules import from inside `deepinfer_nb._proto`.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "deepinfer_nb" / "_proto"
INIT = '"""Generated gRPC code (protos/generate.py). Never edit by hand."""\n'


def generate(out: Path) -> list[str]:
    from grpc_tools import protoc  # test extra: only needed by developers

    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    inc = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{inc}", f"--python_out={out}", f"--pyi_out={out}"]
    args += [f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for f in out.glob("*_pb2*.py"):
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", f.read_text(), flags=re.M)
        f.write_text(text)
    (out / "__init__.py").write_text(INIT)
    return sorted(p.name for p in out.iterdir() if p.suffix in {".py", ".pyi"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if _proto/ is stale")
    args = parser.parse_args()
    if not args.check:
        OUT_DIR.mkdir(exist_ok=True)
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        names = generate(Path(tmp))
        current = sorted(p.name for p in OUT_DIR.iterdir() if p.suffix in {".py", ".pyi"})
        _, mismatch, errors = filecmp.cmpfiles(tmp, OUT_DIR, names, shallow=False)
        if names != current or mismatch or errors:
            print(f"deepinfer_nb/_proto is stale ({mismatch + errors}); run `make proto`")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
