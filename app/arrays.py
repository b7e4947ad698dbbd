"""Array files: reading uploads safely, writing results atomically, converting.

Nothing a client sent is ever unpickled: ``.npy`` is read with
``allow_pickle=False`` and memory-mapped, ``.npz`` members are copied out as
``.npy`` files without being loaded, ``.safetensors`` tensors are copied out in
row chunks.  Every write goes to a temporary name, is fsynced, then renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .problems import Problem

__all__ = [
    "NAME",
    "atomic_path",
    "convert_npy",
    "extract_npz",
    "extract_safetensors",
    "fsync_path",
    "open_npy",
    "sha256_file",
    "write_npy",
    "write_npz",
    "write_safetensors",
]

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
#: Array names: short identifiers, never paths.
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_CHUNK = 1 << 22
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _bad(field: str, reason: str, status: int = 422) -> Problem:
    slug = "unsupported-media-type" if status == 415 else "invalid-array"
    title = "Unsupported media type" if status == 415 else "Invalid array"
    return Problem(status, slug, title, f"{field}: {reason}", field=field)


def magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def open_npy(path: Path, field: str) -> np.ndarray:
    """A float32/float64 ``.npy`` file, memory-mapped; anything else is a 422."""
    if not magic(path).startswith(NPY_MAGIC):
        raise _bad(field, "is not a .npy file (no NumPy magic); pickles are never read")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _bad(field, f"cannot be read as .npy without pickle: {exc}") from None
    if a.dtype not in _FLOATS:
        raise _bad(field, f"must be float32 or float64; got dtype {a.dtype}")
    return a


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (after a rename into it) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _rows(a: np.ndarray) -> Iterator[np.ndarray]:
    """C-order chunks of ``a`` (by leading index) of about ``_CHUNK`` bytes."""
    if a.ndim == 0:
        yield a.reshape(1)
        return
    per = max(1, _CHUNK // max(1, a[0].nbytes if a.shape[0] else 1))
    for i in range(0, a.shape[0], per):
        yield np.ascontiguousarray(a[i : i + per])


def write_npy(path: Path, a: np.ndarray, dtype: np.dtype | None = None) -> tuple[str, int]:
    """Write ``a`` (optionally cast) as ``.npy`` atomically; return (sha256, bytes)."""
    dtype = np.dtype(dtype or a.dtype)
    tmp = atomic_path(path)
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": a.shape,
        }
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
        h.update(buf.getvalue())
        f.write(buf.getvalue())
        for chunk in _rows(a):
            b = chunk.astype(dtype, copy=False).tobytes()
            h.update(b)
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return h.hexdigest(), size


def convert_npy(src: Path, dst: Path, dtype: str) -> None:
    """A ``.npy`` copy of ``src`` in another dtype, written atomically."""
    write_npy(dst, np.load(src, mmap_mode="r", allow_pickle=False), np.dtype(dtype))


def extract_npz(path: Path, out_dir: Path, field: str, max_bytes: int) -> dict[str, Path]:
    """Copy each ``NAME.npy`` member of an ``.npz`` out to ``out_dir`` without loading it."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _bad(field, f"is not a readable .npz archive: {exc}") from None
    out: dict[str, Path] = {}
    with zf:
        infos = zf.infolist()
        if sum(i.file_size for i in infos) > max_bytes:
            raise Problem(
                413,
                "too-large",
                "Too large",
                f"{field}: archive expands past the upload limit",
                field=field,
            )
        for info in infos:
            stem = info.filename[:-4] if info.filename.endswith(".npy") else None
            if stem is None or not NAME.match(stem):
                raise _bad(f"{field}.{info.filename}", "members must be NAME.npy arrays")
            dst = out_dir / f"{stem}.upload"
            try:
                with zf.open(info) as src, open(dst, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                raise _bad(f"{field}.{stem}", f"cannot be extracted: {exc}") from None
            out[stem] = dst
    return out


_ST_DTYPES = {"F32": np.float32, "F64": np.float64}


def extract_safetensors(path: Path, out_dir: Path, field: str) -> dict[str, Path]:
    """Copy each tensor of a ``.safetensors`` file out as ``.npy``, in row chunks."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not NAME.match(key):
                    raise _bad(f"{field}.{key}", "tensor names must be identifiers")
                sl = f.get_slice(key)
                if sl.get_dtype() not in _ST_DTYPES:
                    raise _bad(f"{field}.{key}", f"must be F32 or F64; got {sl.get_dtype()}")
                shape = tuple(sl.get_shape())
                dtype = np.dtype(_ST_DTYPES[sl.get_dtype()])
                dst = out_dir / f"{key}.upload"
                with open(dst, "wb") as g:
                    np.lib.format.write_array_header_2_0(
                        g, {"descr": dtype.str, "fortran_order": False, "shape": shape}
                    )
                    if not shape:
                        g.write(np.asarray(f.get_tensor(key), dtype=dtype).tobytes())
                    else:
                        per = max(1, _CHUNK // max(1, dtype.itemsize * int(np.prod(shape[1:]))))
                        for i in range(0, shape[0], per):
                            stop = min(i + per, shape[0])  # safetensors does not clamp
                            g.write(np.ascontiguousarray(sl[i:stop], dtype=dtype).tobytes())
                out[key] = dst
    except Problem:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise _bad(field, f"is not a readable .safetensors file: {exc}") from None
    return out


def write_npz(dst: Path, arrays: Mapping[str, Path], metadata: Mapping[str, object]) -> None:
    """An uncompressed ``.npz`` of ``.npy`` files, metadata as JSON in the zip comment."""
    tmp = atomic_path(dst)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, src in arrays.items():
            zf.write(src, arcname=f"{name}.npy")
        zf.comment = json.dumps(metadata).encode()[:65535]
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def write_safetensors(dst: Path, arrays: Mapping[str, Path], metadata: Mapping[str, str]) -> None:
    """A ``.safetensors`` file of ``.npy`` files (memory-mapped, contiguous: safetensors
    0.8.0 reads raw memory and would corrupt a non-contiguous array)."""
    from safetensors.numpy import save_file

    tensors = {
        name: np.ascontiguousarray(np.load(src, mmap_mode="r", allow_pickle=False))
        for name, src in arrays.items()
    }
    tmp = atomic_path(dst)
    save_file(tensors, str(tmp), metadata=dict(metadata))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
