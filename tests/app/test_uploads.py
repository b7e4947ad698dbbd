"""Teacher uploads: formats, and every bad input a 4xx problem with nothing stored."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest

from tests.app.conftest import assert_problem, key_of, npy, posterior, start, stored, upload

pytestmark = pytest.mark.anyio


def _asym(a):
    a = a.copy()
    a[0, 1] += 1e-3 * np.abs(a).max()
    return a


def _not_pd(a):
    a = a.copy()
    a[0, 0] = -1.0
    return a


def _nan(a):
    a = a.copy()
    a[1] = np.nan
    return a


CASES = {
    "mean too short": ("full", lambda A: {**A, "mean": A["mean"][:-1]}, "mean"),
    "covariance wrong shape": (
        "full",
        lambda A: {**A, "covariance": A["covariance"][:-1]},
        "covariance",
    ),
    "not symmetric": ("full", lambda A: {**A, "covariance": _asym(A["covariance"])}, "covariance"),
    "not positive definite": (
        "full",
        lambda A: {**A, "covariance": _not_pd(A["covariance"])},
        "covariance",
    ),
    "NaN mean": ("full", lambda A: {**A, "mean": _nan(A["mean"])}, "mean"),
    "NaN covariance": ("full", lambda A: {**A, "covariance": _nan(A["covariance"])}, "covariance"),
    "negative variance": ("diag", lambda A: {**A, "variance": -A["variance"]}, "variance"),
    "zero variance": ("diag", lambda A: {**A, "variance": 0 * A["variance"]}, "variance"),
    "missing covariance": ("full", lambda A: {"mean": A["mean"]}, "covariance"),
    "missing mean": ("diag", lambda A: {"variance": A["variance"]}, "mean"),
    "an unexpected array": ("diag", lambda A: {**A, "extra": A["mean"]}, "extra"),
    "integer dtype": ("diag", lambda A: {**A, "mean": np.arange(len(A["mean"]))}, None),
    "complex dtype": ("diag", lambda A: {**A, "mean": A["mean"].astype(complex)}, "mean"),
    "gradients of the wrong width": (
        "diag",
        lambda A: {**A, "gradients": np.ones((3, 2))},
        "gradients",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_arrays_are_refused_and_nothing_is_stored(svc, case):
    fmt, mutate, field = CASES[case]
    structure, arrays = posterior((3, 4, 4, 2), fmt)
    r = await upload(svc.client, structure, fmt, mutate(arrays))
    body = assert_problem(r, 422)
    if field:
        assert body["field"] == field
    assert (await svc.client.get("/v1/teachers")).json() == []
    assert stored(svc) == []


def _raw(content: bytes):
    return {"mean": ("mean.npy", content, "application/octet-stream")}


async def _raw_case(svc, content: bytes):
    structure, arrays = posterior((3, 4, 4, 2), "diag")
    files = {
        "variance": ("variance.npy", npy(arrays["variance"]), "application/octet-stream"),
        **_raw(content),
    }
    return await upload(svc.client, structure, "diag", None, raw=files)


async def test_an_object_npy_is_never_unpickled(svc, tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    body = assert_problem(await _raw_case(svc, buf.getvalue()), 422, "mean")
    assert "pickle" in body["detail"]
    assert stored(svc) == []


class Boom:
    def __reduce__(self):
        return (open, ("/tmp/pwned-by-planner-test", "w"))


async def test_a_pickle_is_refused_without_being_loaded(svc):
    import os

    payload = pickle.dumps(Boom())
    assert_problem(await _raw_case(svc, payload), 422, "mean")
    assert not os.path.exists("/tmp/pwned-by-planner-test")
    assert stored(svc) == []


async def test_random_bytes_and_truncated_npy(svc):
    rng = np.random.default_rng(0)
    assert_problem(await _raw_case(svc, rng.bytes(1000)), 422, "mean")
    good = npy(np.ones(26))
    assert_problem(await _raw_case(svc, good[: len(good) - 16]), 422, "mean")
    assert stored(svc) == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("{not json", "spec"),
        (json.dumps({"name": "t", "structure": {"widths": [3, 4, 4, 2]}}), "spec.posterior"),
        (
            json.dumps(
                {"name": "t", "structure": {"widths": [3, 2]}, "posterior": {"format": "diag"}}
            ),
            "spec.structure.widths",
        ),
        (
            json.dumps(
                {"name": "t", "structure": {"widths": [3, 0, 2]}, "posterior": {"format": "diag"}}
            ),
            "spec.structure.widths",
        ),
        (
            json.dumps(
                {
                    "name": "t",
                    "structure": {"widths": [3, 4, 4, 2]},
                    "posterior": {"format": "magic"},
                }
            ),
            "spec.posterior.format",
        ),
        (
            json.dumps(
                {
                    "name": "t",
                    "structure": {"widths": [3, 4, 4, 2], "activation": "swish"},
                    "posterior": {"format": "diag"},
                }
            ),
            "spec.structure.activation",
        ),
        (
            json.dumps(
                {"name": "", "structure": {"widths": [3, 4, 4, 2]}, "posterior": {"format": "diag"}}
            ),
            "spec.name",
        ),
    ],
)
async def test_bad_specs(svc, spec, field):
    _, arrays = posterior((3, 4, 4, 2), "diag")
    body = assert_problem(await upload(svc.client, None, "diag", arrays, spec=spec), 422)
    assert body["field"].startswith(field), body
    assert stored(svc) == []


async def test_missing_spec_wrong_media_type_and_mixed_parts(svc):
    structure, arrays = posterior((3, 4, 4, 2), "diag")
    files = {k: (f"{k}.npy", npy(v), "application/octet-stream") for k, v in arrays.items()}
    assert_problem(await svc.client.post("/v1/teachers", files=files), 422, "spec")
    r = await svc.client.post("/v1/teachers", json={"name": "t"})
    assert_problem(r, 415, "content-type")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files["archive"] = ("a.npz", buf.getvalue(), "application/octet-stream")
    spec = {"name": "t", "structure": structure, "posterior": {"format": "diag"}}
    r = await svc.client.post("/v1/teachers", data={"spec": json.dumps(spec)}, files=files)
    assert_problem(r, 422, "archive")
    assert stored(svc) == []


@pytest.mark.parametrize(
    "body",
    [
        b"--B\r\n\x00\x01garbage--B--",  # garbage between the boundaries
        b"--B\r\nxx\r\n\r\nzz\r\n--B--\r\n",  # a header line without a colon
        b"garbage",  # no boundary at all
        b'--B\r\nContent-Disposition: form-data; name="mean"; filename="m.npy"\r\n\r\nab',
    ],
)
async def test_malformed_multipart_is_a_400_problem(svc, body):
    r = await svc.client.post(
        "/v1/teachers", content=body, headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert_problem(r, 400, "body")
    assert stored(svc) == []


async def test_too_large_uploads_are_413(tmp_path):
    svc, ctx = await start(tmp_path / "data", max_upload_bytes=2000)
    try:
        structure, arrays = posterior((3, 4, 4, 2), "full")
        assert_problem(await upload(svc.client, structure, "full", arrays), 413)
        assert stored(svc) == []
    finally:
        await svc.client.aclose()
        await ctx.__aexit__(None, None, None)
    svc, ctx = await start(tmp_path / "data2", max_dense_params=10)
    try:
        structure, arrays = posterior((3, 4, 4, 2), "full")
        assert_problem(await upload(svc.client, structure, "full", arrays), 413, "spec.structure")
        r = await svc.client.post(
            "/v1/structures/sequences",
            content=b"x" * (svc.settings.max_json_bytes + 1),
            headers={"content-type": "application/json"},
        )
        assert_problem(r, 413)
    finally:
        await svc.client.aclose()
        await ctx.__aexit__(None, None, None)


@pytest.mark.parametrize("kind", ["npz", "npz-compressed", "safetensors"])
async def test_archives(svc, kind):
    structure, arrays = posterior((3, 4, 4, 2), "full", seed=3)
    ext = "safetensors" if kind == "safetensors" else "npz"
    path = svc.data.parent / f"a-{kind}.{ext}"
    if kind == "safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    elif kind == "npz":
        np.savez(path, **arrays)
    else:
        np.savez_compressed(path, **arrays)
    raw = {"archive": (path.name, path.read_bytes(), "application/octet-stream")}
    r = await upload(svc.client, structure, "full", None, raw=raw)
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["arrays"]["covariance"]["shape"] == list(arrays["covariance"].shape)
    kept = svc.store.storage.load_npy(key_of(svc, t["id"], "covariance"))
    assert np.array_equal(kept, arrays["covariance"])


async def test_bad_archives(svc):
    structure, _ = posterior((3, 4, 4, 2), "diag")
    for content in (b"PK\x03\x04 garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage"):
        raw = {"archive": ("a.bin", content, "application/octet-stream")}
        assert_problem(await upload(svc.client, structure, "diag", None, raw=raw), 422, "archive")
    buf = io.BytesIO()
    np.savez(buf, **{"../evil": np.ones(3)})
    raw = {"archive": ("a.npz", buf.getvalue(), "application/octet-stream")}
    assert_problem(await upload(svc.client, structure, "diag", None, raw=raw), 422)
    assert stored(svc) == []


def _bomb(name: str, shape: tuple[int, ...], data_bytes: int | None = None) -> bytes:
    """An .npz whose one member's .npy header declares ``shape`` (float64): the data are
    zeros, deflated (so the archive is small), ``data_bytes`` of them (all by default)."""
    buf = io.BytesIO()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(  # the magic and version too
        header, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    left = 8 * int(np.prod(shape)) if data_bytes is None else data_bytes
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open(f"{name}.npy", "w", force_zip64=True) as f,
    ):
        f.write(header.getvalue())
        zeros = bytes(1 << 24)
        while left > 0:
            f.write(zeros[: min(left, len(zeros))])
            left -= len(zeros)
    return buf.getvalue()


async def test_archives_are_checked_from_their_headers_before_extraction(svc):
    """A small archive (288 MB once extracted) declaring a (6000, 6000) variance is refused
    from the member's header (a diag teacher of 36 parameters has at most 36 variances),
    and so is a member whose header and declared size disagree; nothing is stored."""
    structure, _ = posterior((3, 4, 4, 2), "diag")
    bomb = _bomb("variance", (6000, 6000))
    assert len(bomb) < 2**19
    raw = {"archive": ("a.npz", bomb, "application/octet-stream")}
    body = assert_problem(
        await upload(svc.client, structure, "diag", None, raw=raw), 422, "archive.variance"
    )
    assert "at most 36" in body["detail"]
    lying = _bomb("mean", (36,), data_bytes=8)  # declares 36 values, holds 1
    raw = {"archive": ("a.npz", lying, "application/octet-stream")}
    body = assert_problem(
        await upload(svc.client, structure, "diag", None, raw=raw), 422, "archive.mean"
    )
    assert "holds 8 bytes" in body["detail"]
    assert stored(svc) == []


async def test_symmetry_is_checked_at_1e_5_relative_whatever_the_dtype(svc):
    """docs/theory.md §8: a float32 GGN upcast to float64 by its client (2e-8 relative, as
    laplace-torch's) is accepted and symmetrised, its measured asymmetry kept."""
    structure, arrays = posterior((3, 4, 4, 2), "full", seed=4)
    for dtype in (np.float32, np.float64):
        cov = arrays["covariance"].astype(dtype)
        cov[0, 1] *= 1 + 2e-6  # within 1e-5 relative
        r = await upload(
            svc.client, structure, "full", {"mean": arrays["mean"].astype(dtype), "covariance": cov}
        )
        assert r.status_code == 201, r.text
        asym = r.json()["arrays"]["covariance"]["asymmetry"]
        measured = abs(float(cov[0, 1]) - float(cov[1, 0])) / float(np.abs(cov).max())
        assert asym == pytest.approx(measured, rel=1e-6) and asym > 0
        kept = svc.store.storage.load_npy(key_of(svc, r.json()["id"], "covariance"))
        assert kept.dtype == np.float64 and np.array_equal(kept, kept.T)
        cov[0, 1] = cov[1, 0] * (1 + 1e-3) + 1e-4 * np.abs(cov).max()  # beyond it
        assert_problem(
            await upload(
                svc.client, structure, "full", {"mean": arrays["mean"], "covariance": cov}
            ),
            422,
            "covariance",
        )


async def test_bad_part_names_are_refused(svc):
    structure, arrays = posterior((3, 4, 4, 2), "diag")
    raw = {"../../x": ("x.npy", npy(arrays["mean"]), "application/octet-stream")}
    assert_problem(await upload(svc.client, structure, "diag", None, raw=raw), 422, "body")
    assert stored(svc) == []
