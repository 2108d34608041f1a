"""agent.ota.bundle: signature, member checks, hashes, compatibility, extraction."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.ota.bundle import (
    BundleError,
    extract,
    key_id,
    load_trusted_keys,
    open_bundle,
    version_tuple,
)
from protocol import Compatibility, decode_manifest
from tests.bundle_factory import (
    blazeface_files,
    blazeface_manifest,
    build_bundle,
    write_public_key,
)

GOLDEN = b"\x89PNG fake golden image bytes"


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def files() -> dict[str, bytes]:
    return {**blazeface_files(), "golden/astronaut.png": GOLDEN}


def _open(path: Path, keys: list[Ed25519PublicKey], **kw: object) -> object:
    args: dict[str, object] = {
        "agent_version": "1.2.0",
        "runtimes": {"litert"},
        "arch": "x86_64",
        **kw,
    }
    return open_bundle(path, trusted_keys=keys, **args)  # type: ignore[arg-type]


def _reason(path: Path, keys: list[Ed25519PublicKey], **kw: object) -> str:
    with pytest.raises(BundleError) as info:
        _open(path, keys, **kw)
    return info.value.reason


@pytest.mark.parametrize("gzip", [True, False])
def test_signed_bundle_verifies_and_extracts(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes], gzip: bool
) -> None:
    path = build_bundle(tmp_path / "b.efb", blazeface_manifest(), files, key=key, gzip=gzip)
    verified = open_bundle(
        path,
        trusted_keys=[Ed25519PrivateKey.generate().public_key(), key.public_key()],
        agent_version="1.0.0",
        runtimes={"litert"},
        arch="aarch64",
    )
    assert verified.manifest.ref == "blazeface-short-int8@1.0.0"
    assert len(verified.key_id) == 16
    out = extract(verified, tmp_path / "installed")
    assert (out / "golden" / "astronaut.png").read_bytes() == GOLDEN
    assert (out / "blazeface-short-int8.tflite").read_bytes() == files[
        "blazeface-short-int8.tflite"
    ]
    assert decode_manifest((out / "manifest.json").read_bytes()) == verified.manifest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bundle_signed_by_untrusted_key_is_bad_signature(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    path = build_bundle(tmp_path / "b.efb", blazeface_manifest(), files, key=key)
    other = Ed25519PrivateKey.generate().public_key()
    assert _reason(path, [other]) == "bad_signature"


def test_bundle_without_signature_is_unsigned(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    path = build_bundle(tmp_path / "b.efb", blazeface_manifest(), files, key=None)
    assert _reason(path, [key.public_key()]) == "unsigned"


def test_edited_manifest_breaks_the_signature(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    path = build_bundle(tmp_path / "b.efb", blazeface_manifest(), files, key=key)
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    members["manifest.json"] = members["manifest.json"].replace(b'"1.0.0"', b'"9.0.0"')
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert _reason(path, [key.public_key()]) == "bad_signature"


def test_tampered_model_file_is_file_hash_mismatch(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    model = bytearray(files["blazeface-short-int8.tflite"])
    model[5000] ^= 1
    path = build_bundle(
        tmp_path / "b.efb",
        blazeface_manifest(),
        files,
        key=key,
        replace_content={"blazeface-short-int8.tflite": bytes(model)},
    )
    assert _reason(path, [key.public_key()]) == "file_hash_mismatch"


def test_member_not_in_manifest_is_rejected(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    def extra(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("evil.sh")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"rm!"))

    path = build_bundle(
        tmp_path / "b.efb", blazeface_manifest(), files, key=key, extra_members=extra
    )
    assert _reason(path, [key.public_key()]) == "unexpected_member"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("/etc/passwd", tarfile.REGTYPE),
        ("golden/../../x.png", tarfile.REGTYPE),
        ("link", tarfile.SYMTYPE),
        ("hard", tarfile.LNKTYPE),
        ("dev", tarfile.CHRTYPE),
        ("golden", tarfile.DIRTYPE),
    ],
)
def test_unsafe_members_are_rejected_before_anything_is_read(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes], name: str, kind: bytes
) -> None:
    def extra(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info.linkname = "/etc/shadow"
        data = b"x" if kind == tarfile.REGTYPE else b""
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)

    path = build_bundle(
        tmp_path / "b.efb", blazeface_manifest(), files, key=key, extra_members=extra
    )
    assert _reason(path, [key.public_key()]) == "unsafe_member"


def test_duplicate_member_is_rejected(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    def extra(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("golden/astronaut.png")
        info.size = len(GOLDEN)
        tar.addfile(info, io.BytesIO(GOLDEN))

    path = build_bundle(
        tmp_path / "b.efb", blazeface_manifest(), files, key=key, extra_members=extra
    )
    assert _reason(path, [key.public_key()]) == "unsafe_member"


def test_listed_file_missing_from_archive_is_rejected(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    from tests.bundle_factory import with_files

    manifest = with_files(blazeface_manifest(), {**files, "golden/other.png": b"zz"})
    path = build_bundle(tmp_path / "b.efb", manifest, files, key=key, list_files=False)
    assert _reason(path, [key.public_key()]) == "missing_file"


def test_garbage_file_is_bad_archive(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "b.efb"
    path.write_bytes(b"not a tar at all" * 100)
    assert _reason(path, [key.public_key()]) == "bad_archive"


@pytest.mark.parametrize(
    ("compat", "kw"),
    [
        (Compatibility(min_agent_version="1.10.0"), {"agent_version": "1.9.5"}),
        (Compatibility(architectures=["aarch64"]), {"arch": "x86_64"}),
        (Compatibility(runtimes=["onnx"]), {"runtimes": {"litert", "tflite"}}),
        (Compatibility(), {"runtimes": {"onnx"}}),
    ],
)
def test_incompatible_bundles_are_rejected(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    files: dict[str, bytes],
    compat: Compatibility,
    kw: dict[str, object],
) -> None:
    path = build_bundle(
        tmp_path / "b.efb", blazeface_manifest(compatibility=compat), files, key=key
    )
    assert _reason(path, [key.public_key()], **kw) == "incompatible"


def test_compatible_bundle_with_tflite_runtime_and_newer_agent_is_accepted(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    compat = Compatibility(min_agent_version="1.2", architectures=["x86_64", "aarch64"])
    path = build_bundle(
        tmp_path / "b.efb", blazeface_manifest(compatibility=compat), files, key=key
    )
    _open(path, [key.public_key()], agent_version="1.10.0", runtimes={"tflite"})


def test_version_tuple_compares_numerically() -> None:
    assert version_tuple("1.10.0") > version_tuple("1.9.9")
    assert version_tuple("1.2") == version_tuple("1.2.0")
    assert version_tuple("v2.0.0-rc1") == (2,)
    with pytest.raises(ValueError, match="dotted"):
        version_tuple("banana")


def test_extract_refuses_existing_destination(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    path = build_bundle(tmp_path / "b.efb", blazeface_manifest(), files, key=key)
    verified = open_bundle(
        path, trusted_keys=[key.public_key()], agent_version="1", runtimes={"litert"}, arch="x"
    )
    (tmp_path / "installed").mkdir()
    with pytest.raises(BundleError) as info:
        extract(verified, tmp_path / "installed")
    assert info.value.reason == "extract_failed"
    assert list((tmp_path / "installed").iterdir()) == []


def test_load_trusted_keys_reads_pem_and_rejects_junk(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    good = write_public_key(key, tmp_path / "signing.pub")
    (tmp_path / "junk.pub").write_text("hello")
    loaded = load_trusted_keys([good])
    assert loaded == [key.public_key().public_bytes_raw()]
    for bad in (tmp_path / "junk.pub", tmp_path / "missing.pub"):
        with pytest.raises(BundleError, match=bad.name) as info:
            load_trusted_keys([bad])
        assert info.value.reason == "bad_trusted_key"


def _pem(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_load_trusted_keys_names_what_a_wrong_key_file_holds(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    pub = Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    rsa_pub = rsa.generate_private_key(65537, 2048).public_key().public_bytes(*pub)
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*pub)
    good = key.public_key().public_bytes(*pub).decode()
    cases = {
        "private.pem": (private, "found a PEM PRIVATE KEY"),
        "rsa.pub": (rsa_pub, "not an ed25519 public key"),
        "ec.pub": (ec_pub, "not an ed25519 public key"),
        "bad64.pub": (good.replace(good.splitlines()[1][:4], "*!*!").encode(), "not valid base64"),
        "short.pub": (good.replace(good.splitlines()[1], "AAAA").encode(), "3 bytes of DER"),
    }
    for name, (data, says) in cases.items():
        with pytest.raises(BundleError, match=says) as info:
            load_trusted_keys([_pem(tmp_path, name, data)])
        assert info.value.reason == "bad_trusted_key"
        assert name in str(info.value)
    # Surrounding text and CRLF line ends (a key pasted on another system) are fine.
    pasted = _pem(tmp_path, "pasted.pub", b"comment\r\n" + good.replace("\n", "\r\n").encode())
    assert load_trusted_keys([pasted]) == [key.public_key().public_bytes_raw()]


def test_a_bundle_verifies_with_the_raw_keys_the_agent_loads(
    tmp_path: Path, key: Ed25519PrivateKey, files: dict[str, bytes]
) -> None:
    keys = load_trusted_keys([write_public_key(key, tmp_path / "signing.pub")])
    path = build_bundle(tmp_path / "b.efb", blazeface_manifest(), files, key=key)
    verified = open_bundle(
        path, trusted_keys=keys, agent_version="1", runtimes={"litert"}, arch="x"
    )
    assert verified.key_id == key_id(key.public_key()) == key_id(keys[0])
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(BundleError) as info:
        open_bundle(path, trusted_keys=[other], agent_version="1", runtimes={"litert"}, arch="x")
    assert info.value.reason == "bad_signature"


def test_the_daemon_does_not_load_cryptography_until_it_checks_a_signature() -> None:
    import subprocess
    import sys

    code = (
        "import sys, agent.app, agent.cli, agent.ota.wiring\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
