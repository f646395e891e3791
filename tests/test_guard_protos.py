"""The committed gRPC stubs are exactly what `make protos` generates from protos/."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
GENERATED = ("guard_pb2.py", "guard_pb2.pyi", "guard_pb2_grpc.py")


def generate(into: Path) -> int:
    # The same arguments as the Makefile's `protos` target: the virtual include path
    # makes the stubs import each other as `extproc._gen.*`.
    return protoc.main(
        [
            "grpc_tools.protoc",
            f"-Iextproc/_gen={REPO / 'protos'}",
            f"--python_out={into}",
            f"--pyi_out={into}",
            f"--grpc_python_out={into}",
            str(REPO / "protos" / "guard.proto"),
        ]
    )


def test_regenerating_the_stubs_gives_the_committed_files(tmp_path):
    assert generate(tmp_path) == 0
    for name in GENERATED:
        fresh = (tmp_path / "extproc" / "_gen" / name).read_text()
        committed = (REPO / "extproc" / "_gen" / name).read_text()
        assert fresh == committed, (
            f"extproc/_gen/{name} is stale or was made by another grpcio-tools: run `make protos`"
        )
    shutil.rmtree(tmp_path / "extproc")


def test_stubs_import_as_a_package():
    from extproc._gen import guard_pb2, guard_pb2_grpc

    assert guard_pb2.CheckResponse.REJECT == 3
    assert hasattr(guard_pb2_grpc, "GuardServiceStub")
