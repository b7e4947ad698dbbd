"""Storage (``app.storage``) on a local folder and on S3 (SeaweedFS): objects appear
whole or not at all, reads are ranged, remote copies are cached and evicted."""

from __future__ import annotations

import secrets
import time

import numpy as np
import pytest

from app.storage import BLOCK, Storage
from tests.app.cluster import BUCKET


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        yield Storage((tmp_path / "arrays").as_uri())
        return
    request.getfixturevalue("cluster_parts")  # SeaweedFS, its endpoint in the environment
    url = f"s3://{BUCKET}/storage-{secrets.token_hex(4)}"
    st = Storage(url, cache_dir=tmp_path / "cache", cache_bytes=7 * 2**19)
    yield st
    st.close()


def listed(st: Storage) -> list[str]:
    st.fs.invalidate_cache()
    try:
        found = st.fs.find(st.root)
    except FileNotFoundError:
        return []
    return sorted(k[len(st.root) + 1 :] for k in found if k.startswith(f"{st.root}/"))


def test_an_object_appears_whole_when_its_writer_completes(storage):
    data = np.random.default_rng(0).bytes(BLOCK + 12345)  # more than one multipart part
    with storage.writer("a/b.bin") as f:
        f.write(data[:1000])
        assert storage.size("a/b.bin") is None  # nothing while it is written
        f.write(data[1000:])
    assert storage.size("a/b.bin") == len(data)
    assert storage.read_range("a/b.bin", 5, 17) == data[5:17]
    assert storage.read_range("a/b.bin", BLOCK - 3, BLOCK + 3) == data[BLOCK - 3 : BLOCK + 3]
    with storage.open("a/b.bin") as f:
        assert f.read() == data


def test_a_writer_that_fails_leaves_nothing(storage):
    data = np.random.default_rng(1).bytes(BLOCK + 1)  # a multipart upload already begun
    with pytest.raises(RuntimeError), storage.writer("a/gone.bin") as f:
        f.write(data)
        raise RuntimeError("the client went away")
    assert listed(storage) == []
    assert storage.abort_uploads(0.0) == 0  # nothing unfinished left behind either


def test_arrays_round_trip_and_remote_copies_are_cached_and_evicted(storage):
    rng = np.random.default_rng(2)
    arrays = {f"x{i}": rng.normal(size=(256, 512)) for i in range(3)}  # 1 MiB each
    for name, a in arrays.items():
        sha, size = storage.put_npy(f"t/{name}.npy", a)
        assert size == storage.size(f"t/{name}.npy") and len(sha) == 64
    for name, a in arrays.items():
        got = storage.load_npy(f"t/{name}.npy")
        assert np.array_equal(got, a) and not got.flags.writeable
    if storage.local:
        assert storage.local_file("t/x0.npy") == storage.local_path("t/x0.npy")
        return
    first = storage.cached("t/x0.npy")
    assert storage.cached("t/x0.npy") == first  # downloaded once
    for name in arrays:
        storage.cached(f"t/{name}.npy")
    big = rng.normal(size=(512, 512))  # 2 MiB: past the 3.5 MiB cap with the others
    storage.put_npy("t/big.npy", big)
    assert np.array_equal(storage.load_npy("t/big.npy"), big)
    kept = sorted(p.name for p in first.parent.glob("*.npy"))
    assert len(kept) == 2  # the least recently used copies went
    assert storage.cached("t/big.npy").exists()
    storage.forget("t/big.npy")
    assert not storage._cache_path("t/big.npy").exists()


def test_modified_is_the_newest_write_under_a_prefix(storage):
    assert storage.modified("p") is None
    storage.put_npy("p/q/a.npy", np.zeros(3))
    first = storage.modified("p")
    assert first is not None and abs(time.time() - first) < 60
    time.sleep(1.1)
    storage.put_npy("p/r/b.npy", np.zeros(3))
    assert storage.modified("p") > first
    assert storage.modified("p/q") == pytest.approx(first, abs=1.0)
    storage.delete("p")
    assert listed(storage) == [] and storage.modified("p") is None


def test_unfinished_multipart_uploads_are_aborted_after_the_grace(storage):
    if storage.local:
        assert storage.abort_uploads(0.0) == 0
        return
    f = storage.fs.open(storage.path("u/part.bin"), "wb", block_size=BLOCK)
    f.write(b"\0" * (BLOCK + 1))
    f.flush()  # the first part is uploaded: an unfinished multipart upload exists
    assert listed(storage) == []
    assert storage.abort_uploads(3600.0) == 0  # within the grace: left alone
    assert storage.abort_uploads(0.0) == 1
    f.mpu, f.closed = None, True  # already aborted: nothing for the file to finish
    assert listed(storage) == []
