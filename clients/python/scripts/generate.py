"""Generate the layerd.v1 stubs of the Python package from the repo's proto.

    python scripts/generate.py          # rewrite src/layerd/v1/layerd_pb2*.py(i)
    python scripts/generate.py --check  # exit 1 if the checked-in stubs are stale

Run with the grpcio-tools version pinned in requirements-dev.txt: other
versions write (harmlessly) different code.
"""
import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PACKAGE = Path(__file__).resolve().parents[1]
REPO = PACKAGE.parents[1]
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "layerd" / "v1" / "layerd.proto"
OUT = PACKAGE / "src"
FILES = ["layerd_pb2.py", "layerd_pb2.pyi", "layerd_pb2_grpc.py"]


def generate(out):
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", str(PROTO)])
    if rc != 0:
        sys.exit(f"protoc failed on {PROTO}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        print(f"wrote {', '.join(FILES)} in {OUT / 'layerd' / 'v1'}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        stale = [f for f in FILES if not filecmp.cmp(Path(tmp) / "layerd" / "v1" / f,
                                                     OUT / "layerd" / "v1" / f, shallow=False)]
    if stale:
        sys.exit(f"stale generated stubs: {', '.join(stale)}; run python clients/python/scripts/generate.py")
    print("generated stubs are current")


if __name__ == "__main__":
    main()
