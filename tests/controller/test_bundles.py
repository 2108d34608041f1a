"""Model bundles (docs/bundles.md): keys, packaging with golden outputs from a real local
inference run, signing, and every way a bundle must be rejected."""

from __future__ import annotations

import io
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import cv2
import msgspec
import pytest

from controller.bundles import (
    BundleError,
    package_model,
    read_bundle,
    sign_bundle,
    verify_signature,
)
from controller.keys import SigningKeyError, generate_keys, load_private_key, load_public_key
from protocol import decode_manifest, encode_manifest
from protocol.bundle import key_id
from tests import images

ASSETS = Path(__file__).resolve().parents[2] / "inference" / "assets"
MANIFEST = ASSETS / "blazeface-short-int8.json"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="module")
def astronaut(work: Path) -> Path:
    path = work / "astronaut.png"
    rgb = images.astronaut()
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def keydir(work: Path) -> Path:
    generate_keys(work / "keys")
    return work / "keys"


@pytest.fixture(scope="module")
def packaged(work: Path, astronaut: Path) -> Path:
    """The shipped int8 BlazeFace packaged once (unsigned) with the astronaut as golden."""
    out = work / "blazeface-1.0.0.efb"
    package_model(
        MANIFEST,
        out=out,
        name="blazeface",
        version="1.0.0",
        golden=[astronaut],
        latency_budget_ms=50.0,
    )
    return out


@pytest.fixture
def signed(packaged: Path, keydir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "signed.efb"
    path.write_bytes(packaged.read_bytes())
    sign_bundle(path, load_private_key(keydir / "signing.key"))
    return path


def test_generated_keys_round_trip_with_private_file_mode_and_stable_key_id(keydir: Path) -> None:
    private = load_private_key(keydir / "signing.key")
    public = load_public_key(keydir / "signing.pub")
    assert stat.S_IMODE((keydir / "signing.key").stat().st_mode) == 0o600
    assert key_id(private.public_key()) == key_id(public)
    assert len(key_id(public)) == 16
    public.verify(private.sign(b"x"), b"x")


def test_generating_keys_refuses_to_overwrite_existing_ones(keydir: Path) -> None:
    before = (keydir / "signing.key").read_bytes()
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        generate_keys(keydir)
    assert (keydir / "signing.key").read_bytes() == before


def test_packaging_runs_the_model_and_stores_the_astronaut_face_as_golden(packaged: Path) -> None:
    info = read_bundle(packaged)
    m = info.manifest
    assert (m.name, m.version, m.latency_budget_ms) == ("blazeface", "1.0.0", 50.0)
    assert {f.path for f in m.files} == {"blazeface-short-int8.tflite", "golden/astronaut.png"}
    model = next(f for f in m.files if f.path == m.model)
    assert model.sha256 == "fb00cc089a03c4c676903c8f48a0bd773a162ccd4ac179208a6589cf3b74ef5c"
    [sample] = m.golden
    assert sample.image == "golden/astronaut.png"
    [(label, score, box)] = sample.expected
    assert label == "face"
    assert score == pytest.approx(0.905, abs=0.01)
    assert box[0] < box[2] and box[1] < box[3]
    assert info.signature is None


def test_packaging_a_model_file_needs_a_manifest_template(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="--manifest-template"):
        package_model(
            ASSETS / "blazeface-short-int8.tflite", out=tmp_path / "x.efb", name="m", version="1"
        )


def test_packaging_a_model_file_with_a_template_and_runtime_override(tmp_path: Path) -> None:
    out = tmp_path / "x.efb"
    package_model(
        ASSETS / "blazeface-short.onnx",
        out=out,
        name="face-onnx",
        version="2",
        runtime="onnx",
        manifest_template=ASSETS / "blazeface-short-onnx.json",
    )
    m = read_bundle(out).manifest
    assert (m.model, m.runtime, m.compatibility.runtimes) == (
        "blazeface-short.onnx",
        "onnx",
        ["onnx"],
    )


def test_signed_bundle_verifies_with_its_public_key(signed: Path, keydir: Path) -> None:
    info = read_bundle(signed)
    public = load_public_key(keydir / "signing.pub")
    assert info.signature is not None
    assert verify_signature(info, [public]) == key_id(public)
    assert info.manifest.golden  # signing kept every member


def _rewrite(src: Path, dst: Path, edit: Callable[[tarfile.TarFile, str, bytes], None]) -> Path:
    """Copy ``src`` to ``dst`` member by member; ``edit(out, name, data)`` writes each one."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            f = tin.extractfile(m)
            assert f is not None
            edit(tout, m.name, f.read())
    return dst


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tampered_model_byte_is_rejected_with_a_hash_mismatch(signed: Path, tmp_path: Path) -> None:
    def flip(out: tarfile.TarFile, name: str, data: bytes) -> None:
        if name.endswith(".tflite"):
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        _add(out, name, data)

    bad = _rewrite(signed, tmp_path / "bad.efb", flip)
    with pytest.raises(
        BundleError, match=r"'blazeface-short-int8.tflite' has sha256 .* manifest says"
    ):
        read_bundle(bad)


def test_tampered_manifest_fails_the_signature(signed: Path, tmp_path: Path, keydir: Path) -> None:
    def relabel(out: tarfile.TarFile, name: str, data: bytes) -> None:
        if name == "manifest.json":
            m = decode_manifest(data)
            data = encode_manifest(msgspec.structs.replace(m, min_score=0.1))
        _add(out, name, data)

    bad = _rewrite(signed, tmp_path / "bad.efb", relabel)
    info = read_bundle(bad)  # structure and hashes are still fine
    with pytest.raises(BundleError, match="does not verify with any trusted key"):
        verify_signature(info, [load_public_key(keydir / "signing.pub")])


def test_wrong_key_is_rejected_naming_the_trusted_key_ids(signed: Path, tmp_path: Path) -> None:
    _, pub, kid = generate_keys(tmp_path / "other")
    with pytest.raises(BundleError, match=f"does not verify with any trusted key \\({kid}\\)"):
        verify_signature(read_bundle(signed), [load_public_key(pub)])


def test_unsigned_bundle_fails_signature_check_saying_how_to_sign(
    packaged: Path, keydir: Path
) -> None:
    with pytest.raises(BundleError, match=r"not signed .*edgefleet model sign"):
        verify_signature(read_bundle(packaged), [load_public_key(keydir / "signing.pub")])


def _append(src: Path, dst: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    def copy(out: tarfile.TarFile, name: str, body: bytes) -> None:
        _add(out, name, body)

    _rewrite(src, dst, copy)
    with tarfile.open(dst, "a") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return dst


def _file(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


@pytest.mark.parametrize(
    ("member", "data", "message"),
    [
        (_file("notes.txt", 3), b"hi\n", "'notes.txt' is not listed in the manifest"),
        (_file("../evil", 3), b"bad", r"unsafe member name '\.\./evil'"),
        (_file("/etc/evil", 3), b"bad", r"unsafe member name '/etc/evil'"),
        (_file("manifest.json", 2), b"{}", "'manifest.json' appears twice"),
    ],
    ids=["extra", "dotdot", "absolute", "duplicate"],
)
def test_bad_members_are_rejected_with_a_specific_message(
    signed: Path, tmp_path: Path, member: tarfile.TarInfo, data: bytes, message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        read_bundle(_append(signed, tmp_path / "bad.efb", member, data))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (tarfile.SYMTYPE, "a symlink"),
        (tarfile.LNKTYPE, "a hard link"),
        # agents refuse directory members, so the controller must too (protocol.bundle)
        (tarfile.DIRTYPE, "a directory"),
    ],
)
def test_link_members_are_rejected(signed: Path, tmp_path: Path, kind: bytes, message: str) -> None:
    link = tarfile.TarInfo("golden/link.png")
    link.type = kind
    link.linkname = "/etc/passwd"
    with pytest.raises(BundleError, match=f"'golden/link.png' of .* is {message}"):
        read_bundle(_append(signed, tmp_path / "bad.efb", link))


def test_missing_listed_file_is_rejected(signed: Path, tmp_path: Path) -> None:
    def drop_golden(out: tarfile.TarFile, name: str, data: bytes) -> None:
        if not name.startswith("golden/"):
            _add(out, name, data)

    bad = _rewrite(signed, tmp_path / "bad.efb", drop_golden)
    with pytest.raises(
        BundleError, match=r"'golden/astronaut\.png' is listed in the manifest but missing"
    ):
        read_bundle(bad)


def test_gzip_compressed_bundle_is_read(signed: Path, tmp_path: Path) -> None:
    import gzip

    gz = tmp_path / "signed.efb"
    gz.write_bytes(gzip.compress(signed.read_bytes()))
    assert read_bundle(gz).manifest.name == "blazeface"


def test_not_a_tar_file_is_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.efb"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(BundleError, match="is not a bundle"):
        read_bundle(junk)


def test_hosting_from_config_resolves_blob_dir_and_loads_trusted_keys(
    keydir: Path, tmp_path: Path
) -> None:
    from controller.blobstore import hosting_from_config
    from controller.config import load_config

    config = tmp_path / "controller.toml"
    config.write_text(
        f'data_dir = "state"\n[models]\nmax_bundle_bytes = 1000\ntrusted_keys = ["{keydir}/signing.pub"]\n'
    )
    hosting = hosting_from_config(load_config(config, env={}))
    assert hosting.blobs.root == tmp_path / "state" / "blobs"
    assert hosting.max_bundle_bytes == 1000
    assert [key_id(k) for k in hosting.trusted_keys] == [
        key_id(load_public_key(keydir / "signing.pub"))
    ]
    sha = "ab" * 32
    assert (
        hosting.blobs.path_for(sha) == tmp_path / "state" / "blobs" / "sha256" / "ab" / f"{sha}.efb"
    )
    with pytest.raises(ValueError, match="not a sha256"):
        hosting.blobs.path_for("../../etc/passwd")
