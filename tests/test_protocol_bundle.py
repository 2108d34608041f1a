"""protocol.bundle: the bundle rules the controller and the agent share."""

from __future__ import annotations

import base64
import hashlib

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol import Manifest, decode_manifest
from protocol.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleFormatError,
    check_compatibility,
    check_listing,
    check_member_name,
    key_id,
    sign_manifest,
    verify_signature,
)
from tests.conftest import ASSETS

SHA = "0" * 64


def _manifest(**compat: object) -> Manifest:
    data = msgspec.to_builtins(decode_manifest((ASSETS / "blazeface-short-int8.json").read_bytes()))
    data["files"] = [
        {"path": data["model"], "sha256": SHA, "size": 1},
        {"path": "golden/a.png", "sha256": SHA, "size": 1},
    ]
    data["golden"] = [{"image": "golden/a.png", "expected": []}]
    data["compatibility"] = {**data.get("compatibility", {}), **compat}
    return decode_manifest(msgspec.json.encode(data))


def _reason(excinfo: pytest.ExceptionInfo[BundleFormatError]) -> str:
    return excinfo.value.reason


def test_key_id_is_the_sha256_prefix_of_the_raw_public_key() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert key_id(key) == hashlib.sha256(raw).hexdigest()[:16]


def test_a_signature_verifies_with_its_key_and_names_it() -> None:
    manifest = _manifest()
    signer, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signature = sign_manifest(manifest, signer)
    keys = [other.public_key(), signer.public_key()]
    assert verify_signature(manifest, signature, keys) == key_id(signer.public_key())
    assert verify_signature(manifest, signature.encode() + b"\n", keys) == key_id(
        signer.public_key()
    )


@pytest.mark.parametrize(
    ("signature", "reason", "words"),
    [
        (None, "unsigned", "not signed"),
        ("***", "bad_signature", "not valid base64"),
        (base64.b64encode(b"x" * 64).decode(), "bad_signature", "does not verify"),
    ],
    ids=["missing", "not-base64", "forged"],
)
def test_bad_signatures_are_refused_with_a_reason(
    signature: str | None, reason: str, words: str
) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(BundleFormatError, match=words) as info:
        verify_signature(_manifest(), signature, [key])
    assert _reason(info) == reason


def test_a_changed_manifest_no_longer_verifies() -> None:
    key = Ed25519PrivateKey.generate()
    signature = sign_manifest(_manifest(), key)
    with pytest.raises(BundleFormatError, match=key_id(key.public_key())) as info:
        verify_signature(_manifest(architectures=["aarch64"]), signature, [key.public_key()])
    assert _reason(info) == "bad_signature"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "./model.tflite", "a//b", "golden/", ""])
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(BundleFormatError) as info:
        check_member_name(name)
    assert _reason(info) == "unsafe_member"


@pytest.mark.parametrize("name", ["model.tflite", "golden/a.png", MANIFEST_NAME, "a-b_c.1/x"])
def test_good_member_names_pass(name: str) -> None:
    check_member_name(name)


def test_listing_must_match_the_archive_exactly() -> None:
    manifest = _manifest()
    good = {MANIFEST_NAME, SIGNATURE_NAME, manifest.model, "golden/a.png"}
    check_listing(manifest, good)
    check_listing(manifest, good - {SIGNATURE_NAME})
    with pytest.raises(BundleFormatError, match=r"notes\.txt") as extra:
        check_listing(manifest, good | {"notes.txt"})
    assert _reason(extra) == "unexpected_member"
    with pytest.raises(BundleFormatError, match=r"golden/a\.png") as missing:
        check_listing(manifest, good - {"golden/a.png"})
    assert _reason(missing) == "missing_file"


def test_compatibility_accepts_a_matching_device_and_names_what_does_not_match() -> None:
    manifest = _manifest(min_agent_version="0.1.0", architectures=["x86_64", "aarch64"])
    check_compatibility(manifest, agent_version="0.1.0", runtimes={"tflite"}, arch="aarch64")
    for version, runtimes, arch, words in [
        ("0.0.9", {"litert"}, "x86_64", r"needs agent 0\.1\.0"),
        ("0.2", {"onnx"}, "x86_64", "runtime"),
        ("0.2", {"litert"}, "armv7l", "armv7l"),
    ]:
        with pytest.raises(BundleFormatError, match=words) as info:
            check_compatibility(manifest, agent_version=version, runtimes=runtimes, arch=arch)
        assert _reason(info) == "incompatible"
