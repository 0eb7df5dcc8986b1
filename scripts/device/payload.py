"""Stage and pack what the GPU machine lacks for the Triton ensemble run (``build_payload.sh`` calls this).

The GPU machine has Python 3.12 with torch and transformers but no tritonserver, no onnxruntime-gpu, no
perf_analyzer and no network, and each call there carries at most 64 MiB. Commands:

- ``triton DEST --python 3.12``: the ``nvidia-pytriton`` wheel's ``tritonserver`` (a CUDA build), its Python
  backend with the stub of that Python, and only the bundled libraries those three need (the ``NEEDED``
  closure read with ``readelf``: the wheel's copy of libpython 3.13 and ICU's data are not among them), in
  the wheel's own layout so the ``$ORIGIN`` RPATHs resolve.
- ``perf DEST``: ``perf_analyzer`` from ``tritonclient==2.50.0`` with ``lib/libb64.so.0d`` and
  ``lib/libcudart.so.12`` (both copied from the pytriton wheel's bundled ones; the loader matches file names).
- ``site DEST WHEEL...``: wheels unpacked into one folder for ``PYTHONPATH`` (data folders, tests and
  bytecode dropped); ``--ort-keep-sm 90`` prunes onnxruntime-gpu's CUDA kernels to that GPU generation
  (:mod:`prune_fatbin`) and drops its TensorRT provider and C API library.
- ``pack SRC OUT``: ``tar | xz -9e`` of a staged folder (``--level``), with its size.

Raises (as a non-zero exit): a file named above is missing, or a needed library is not bundled.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger("payload")

SYSTEM_LIBS = ("libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "libstdc++.so", "libgcc_s.so",
               "ld-linux", "libz.so", "libresolv.so", "libpython3")


class PayloadError(RuntimeError):
    """A file the payload needs is missing."""


def pytriton_root() -> tuple[Path, Path]:
    """(the wheel's ``pytriton/tritonserver``, its ``nvidia_pytriton.libs``) of the installed nvidia-pytriton.

    Raises:
        PayloadError: nvidia-pytriton is not installed (``make install`` installs it).
    """
    try:
        import pytriton  # type: ignore[import-not-found]
    except ImportError as exc:
        raise PayloadError("nvidia-pytriton is not installed here (make install)") from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root, root.parent.parent / "nvidia_pytriton.libs"


def needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-dW", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def closure(roots: list[Path], libs: Path) -> list[Path]:
    """The bundled libraries ``roots`` need, transitively; system libraries are left to the machine.

    Raises:
        PayloadError: a needed non-system library is not in ``libs``.
    """
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        for name in needed(todo.pop()):
            if name in seen:
                continue
            if (libs / name).is_file():
                seen[name] = libs / name
                todo.append(libs / name)
            elif not name.startswith(SYSTEM_LIBS):
                raise PayloadError(f"{name} is needed but neither bundled in {libs} nor a system library")
    return sorted(seen.values())


def stage_triton(dest: Path, python: str) -> None:
    root, libs = pytriton_root()
    stub = root / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise PayloadError(f"no Python {python} stub in {root / 'python_backend_stubs'}")
    server = dest / "pytriton" / "tritonserver"
    (server / "bin").mkdir(parents=True, exist_ok=True)
    (server / "backends" / "python").mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "bin" / "tritonserver", server / "bin" / "tritonserver")
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(root / "backends" / "python" / name, server / "backends" / "python" / name)
    # Beside libtriton_python.so, where the backend looks; its RPATH ($ORIGIN/../../../../nvidia_pytriton.libs)
    # resolves from there as from python_backend_stubs/X.Y.
    shutil.copy2(stub, server / "backends" / "python" / "triton_python_backend_stub")
    keep = closure([root / "bin" / "tritonserver", root / "backends" / "python" / "libtriton_python.so", stub], libs)
    (dest / "nvidia_pytriton.libs").mkdir(exist_ok=True)
    for lib in keep:
        shutil.copy2(lib, dest / "nvidia_pytriton.libs" / lib.name)
    dropped = sorted(p.name for p in libs.iterdir() if p not in keep)
    log.info("tritonserver: %d bundled libraries kept (%.1f MB), %d dropped: %s", len(keep),
             sum(p.stat().st_size for p in keep) / 1e6, len(dropped), ", ".join(dropped))


def stage_perf(dest: Path, binary: Path) -> None:
    if not binary.is_file():
        raise PayloadError(f"{binary} missing (make install unpacks tritonclient 2.50.0's perf_analyzer there)")
    _, libs = pytriton_root()
    (dest / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest / "perf_analyzer")
    for pattern, soname in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        found = sorted(libs.glob(pattern))
        if not found:
            raise PayloadError(f"no {pattern} in {libs}")
        shutil.copy2(found[0], dest / "lib" / soname)


def stage_site(dest: Path, wheels: list[Path], ort_keep_sm: str | None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                parts = member.split("/")
                if parts[0].endswith(".data") or "tests" in parts or member.endswith(".pyc"):
                    continue  # scripts/binaries (tritonclient's perf_analyzer), test suites, bytecode
                zf.extract(member, dest)
    capi = dest / "onnxruntime" / "capi"
    cuda = capi / "libonnxruntime_providers_cuda.so"
    if cuda.is_file() and ort_keep_sm:
        sys.path.insert(0, str(Path(__file__).parent))
        import prune_fatbin

        pruned = cuda.with_suffix(".pruned")
        prune_fatbin.main([str(cuda), str(pruned), "--keep", ort_keep_sm])
        pruned.replace(cuda)
        # The TensorRT provider (needs TensorRT, absent there) and the C API library (the Python binding does
        # not link it: readelf shows no NEEDED entry for it) are not loaded by `import onnxruntime`.
        for extra in [*capi.glob("libonnxruntime_providers_tensorrt.so"), *capi.glob("libonnxruntime.so*")]:
            extra.unlink()
    for so in dest.rglob("*.so*"):
        so.chmod(0o755)


def pack(src: Path, out: Path, level: str = "9e") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE)
        subprocess.run(["xz", f"-{level}", "-T", str(os.cpu_count() or 1), "-c"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait() != 0:
            raise PayloadError(f"tar of {src} failed")
    log.info("%s: %.1f MiB", out, out.stat().st_size / 2**20)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("triton")
    t.add_argument("dest", type=Path)
    t.add_argument("--python", default="3.12")
    f = sub.add_parser("perf")
    f.add_argument("dest", type=Path)
    f.add_argument("--binary", type=Path, default=Path(sys.prefix) / "opt" / "perf_analyzer" / "perf_analyzer")
    s = sub.add_parser("site")
    s.add_argument("dest", type=Path)
    s.add_argument("wheels", type=Path, nargs="+")
    s.add_argument("--ort-keep-sm", default=None, help="SM versions of onnxruntime-gpu's kernels to keep, e.g. 90")
    k = sub.add_parser("pack")
    k.add_argument("src", type=Path)
    k.add_argument("out", type=Path)
    k.add_argument("--level", default="9e", help="xz preset (0 = fast, for tests)")
    args = p.parse_args(argv)
    try:
        if args.command == "triton":
            stage_triton(args.dest, args.python)
        elif args.command == "perf":
            stage_perf(args.dest, args.binary)
        elif args.command == "site":
            stage_site(args.dest, args.wheels, args.ort_keep_sm)
        else:
            pack(args.src, args.out, args.level)
    except PayloadError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
