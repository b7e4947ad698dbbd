"""Array files: reading uploads safely, and the streams the service serves.

Nothing a client sent is ever unpickled: ``.npy`` is read with
``allow_pickle=False`` and memory-mapped, ``.npz`` members are copied out as
``.npy`` files without being loaded, ``.safetensors`` tensors are copied out in
row chunks.  What the service writes (``.npy`` chunks, float32 copies, ``.npz``
and ``.safetensors`` archives) is produced as streams, so the same code writes
into a local folder or an S3 object (``app.storage`` commits it whole).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .problems import Problem

__all__ = [
    "NAME",
    "ZIP_MAGIC",
    "convert_npy",
    "extract_npz",
    "extract_safetensors",
    "load_npy_stream",
    "magic",
    "npy_chunks",
    "open_npy",
    "read_npy_header",
    "sha256_file",
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


def _rows(a: np.ndarray) -> Iterator[np.ndarray]:
    """C-order chunks of ``a`` (by leading index) of about ``_CHUNK`` bytes."""
    if a.ndim == 0:
        yield a.reshape(1)
        return
    per = max(1, _CHUNK // max(1, a[0].nbytes if a.shape[0] else 1))
    for i in range(0, a.shape[0], per):
        yield np.ascontiguousarray(a[i : i + per])


def npy_header(shape, dtype) -> bytes:
    buf = io.BytesIO()
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def npy_chunks(a: np.ndarray, dtype=None) -> Iterator[bytes]:
    """``a`` (optionally cast) as the bytes of a ``.npy`` file, header first, in chunks."""
    dtype = np.dtype(dtype or a.dtype)
    yield npy_header(a.shape, dtype)
    for chunk in _rows(a):
        yield chunk.astype(dtype, copy=False).tobytes()


def read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a ``.npy`` stream; no pickles, no object arrays."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = read(f, max_header_size=10000)
    if fortran or dtype.hasobject:
        raise ValueError("only C-ordered numeric arrays are served")
    return tuple(shape), dtype, f.tell()


def convert_npy(src: BinaryIO, dst: BinaryIO, dtype: str) -> None:
    """Copy a ``.npy`` stream as another dtype, chunk by chunk."""
    shape, old, _ = read_npy_header(src)
    new = np.dtype(dtype)
    dst.write(npy_header(shape, new))
    per = max(1, _CHUNK // old.itemsize)
    left = int(np.prod(shape, dtype=np.int64))
    while left:
        n = min(per, left)
        block = np.frombuffer(src.read(n * old.itemsize), dtype=old, count=n)
        dst.write(block.astype(new).tobytes())
        left -= n


def load_npy_stream(f: BinaryIO) -> np.ndarray:
    """A ``.npy`` stream read whole into memory (never unpickled)."""
    return np.load(f, allow_pickle=False)


def write_npz(dst: BinaryIO, arrays: Mapping[str, Callable[[], BinaryIO]], metadata) -> None:
    """An uncompressed ``.npz`` of ``.npy`` objects (opened by the callables) written to a
    stream that need not be seekable; metadata as JSON in the zip comment."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, opener in arrays.items():
            with opener() as src, zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                shutil.copyfileobj(src, out, _CHUNK)
        zf.comment = json.dumps(metadata).encode()[:65535]


def write_safetensors(
    dst: BinaryIO, arrays: Mapping[str, Callable[[], BinaryIO]], metadata: Mapping[str, str]
) -> None:
    """A ``.safetensors`` file of ``.npy`` objects, streamed: the header (names, dtypes,
    shapes, byte ranges, metadata) then each tensor's raw little-endian data."""
    names = {"float64": "F64", "float32": "F32"}
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset, layout = 0, []
    for name, opener in arrays.items():
        with opener() as src:
            shape, dtype, start = read_npy_header(src)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": names[dtype.name],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        layout.append((opener, start, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    dst.write(len(raw).to_bytes(8, "little"))
    dst.write(raw)
    for opener, start, nbytes in layout:
        with opener() as src:
            src.seek(start)
            left = nbytes
            while left:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    raise OSError("array shorter than its header says")
                dst.write(chunk)
                left -= len(chunk)


def _npy_header(src: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, dtype and header length of a ``.npy`` stream, reading its header only."""
    version = np.lib.format.read_magic(src)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(src)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(src)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), np.dtype(dtype), src.tell()


def _member_problem(info: zipfile.ZipInfo, where: str) -> Problem | None:
    """Why a zip member cannot be read here (encrypted, an unknown compression)."""
    if info.flag_bits & 0x1:
        return _bad(where, "is encrypted; send the archive without a password")
    if info.compress_type not in _COMPRESSIONS:
        return _bad(
            where,
            f"uses zip compression method {info.compress_type}; use stored or deflated "
            "(numpy's savez or savez_compressed)",
        )
    return None


_COMPRESSIONS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def _check_name(where: str, name: str, allowed: set[str] | None) -> None:
    """An archive member's name must be one of the format's arrays."""
    if allowed is not None and name not in allowed:
        raise _bad(where, f"is not an array of this format; expected {sorted(allowed)}")


def _check_size(where: str, name: str, shape, max_elements) -> int:
    """An archive member's declared element count, at most what the structure implies."""
    n = int(np.prod(shape, dtype=object))
    limit = max_elements(name) if max_elements is not None else None
    if limit is not None and n > limit:
        raise _bad(
            where,
            f"declares shape {tuple(shape)} ({n} elements); this structure's {name!r} has "
            f"at most {limit}",
        )
    return n


def extract_npz(
    path: Path,
    out_dir: Path,
    field: str,
    max_bytes: int,
    max_elements: Callable[[str], int] | None = None,
    allowed: set[str] | None = None,
) -> dict[str, Path]:
    """Copy each ``NAME.npy`` member of an ``.npz`` out to ``out_dir`` without loading it.

    Nothing is extracted before every member passes what its headers say: the zip's
    declared sizes against ``max_bytes``, and each member's own ``.npy`` header (read
    alone, a few hundred bytes) for a float dtype, a size that matches the zip's
    declared size, and at most ``max_elements(name)`` elements, what the structure
    implies; only ``allowed`` names, never encrypted or in an unknown compression.
    A small archive that declares a huge array (a decompression bomb) is refused in
    milliseconds."""
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
        members = []
        for info in infos:
            stem = info.filename[:-4] if info.filename.endswith(".npy") else None
            if stem is None or not NAME.match(stem):
                raise _bad(f"{field}.{info.filename[:80]}", "members must be NAME.npy arrays")
            where = f"{field}.{stem}"
            _check_name(where, stem, allowed)
            if (odd := _member_problem(info, where)) is not None:
                raise odd
            try:
                with zf.open(info) as src:
                    shape, dtype, header = _npy_header(src)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
                raise _bad(where, f"has no readable .npy header: {exc}") from None
            if dtype not in _FLOATS:
                raise _bad(where, f"must be float32 or float64; got dtype {dtype}")
            n = int(np.prod(shape, dtype=object))
            if header + n * dtype.itemsize != info.file_size:
                raise _bad(
                    where,
                    f"declares shape {shape} ({n * dtype.itemsize} bytes of data) but holds "
                    f"{info.file_size - header} bytes",
                )
            _check_size(where, stem, shape, max_elements)
            members.append((info, stem))
        for info, stem in members:
            dst = out_dir / f"{stem}.upload"
            try:
                with zf.open(info) as src, open(dst, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)
            except (
                zipfile.BadZipFile,
                OSError,
                EOFError,
                ValueError,
                NotImplementedError,
                RuntimeError,
            ) as exc:
                raise _bad(f"{field}.{stem}", f"cannot be extracted: {exc}") from None
            out[stem] = dst
    return out


_ST_DTYPES = {"F32": np.float32, "F64": np.float64}


def extract_safetensors(
    path: Path,
    out_dir: Path,
    field: str,
    max_elements: Callable[[str], int] | None = None,
    allowed: set[str] | None = None,
) -> dict[str, Path]:
    """Copy each tensor of a ``.safetensors`` file out as ``.npy``, in row chunks, after
    every tensor's name, dtype and shape passed (from the header alone)."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            for key in keys:  # every header first, nothing extracted before
                if not NAME.match(key):
                    raise _bad(f"{field}.{key[:80]}", "tensor names must be identifiers")
                _check_name(f"{field}.{key}", key, allowed)
                sl = f.get_slice(key)
                if sl.get_dtype() not in _ST_DTYPES:
                    raise _bad(f"{field}.{key}", f"must be F32 or F64; got {sl.get_dtype()}")
                _check_size(f"{field}.{key}", key, sl.get_shape(), max_elements)
            for key in keys:
                sl = f.get_slice(key)
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
