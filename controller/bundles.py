"""Build, read, sign and verify model bundles (``.efb``, format in docs/bundles.md).

A bundle is a tar archive (optionally gzip) with ``manifest.json``, ``manifest.sig`` and
every other member listed in ``manifest.files`` with its sha256 and size. ``read_bundle``
checks the structure and hashes; ``verify_signature`` checks the ed25519 signature over
``protocol.encode_manifest(manifest)``.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import atomic_writer
from controller.errors import ControllerError
from protocol import Manifest, ProtocolError, decode_manifest, encode_manifest
from protocol import bundle as bundle_format
from protocol.bundle import MANIFEST_NAME, SIGNATURE_NAME, BundleFormatError, sign_manifest
from protocol.manifest import check_relative_path

_CHUNK = 1 << 20


class BundleError(ControllerError):
    """A bundle is malformed, does not match its manifest, or its signature does not verify."""


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """A bundle whose structure and member hashes were checked."""

    manifest: Manifest
    signature: str | None
    """The base64 ``manifest.sig``, or None when unsigned."""
    sha256: str
    """Of the whole ``.efb`` file."""
    size: int


def file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _stream_sha256(f: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _member_kind(m: tarfile.TarInfo) -> str | None:
    if m.issym():
        return "a symlink"
    if m.islnk():
        return "a hard link"
    if m.isdev() or m.isfifo():
        return "a device or fifo"
    if m.isdir():
        return "a directory"
    if not m.isfile():
        return "not a regular file"
    return None


@contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError as err:
        raise BundleError(f"bundle {path} not found") from err
    except (tarfile.TarError, OSError) as err:
        raise BundleError(
            f"{path} is not a bundle (a tar archive, optionally gzip): {err}; "
            "build one with `edgefleet model package`"
        ) from err
    try:
        yield tar
    finally:
        tar.close()


def read_bundle(path: Path) -> BundleInfo:  # noqa: PLR0912 - one check per rule of the format
    """Check ``path`` against docs/bundles.md; raise BundleError naming the first problem."""
    seen: set[str] = set()
    hashes: dict[str, tuple[str, int]] = {}
    manifest_bytes: bytes | None = None
    signature: str | None = None
    with _open_tar(path) as tar:
        try:
            for m in tar:
                name = m.name
                try:
                    bundle_format.check_member_name(name)
                except BundleFormatError as err:
                    raise BundleError(f"{path}: {err}") from err
                kind = _member_kind(m)
                if kind is not None:
                    raise BundleError(
                        f"member {name!r} of {path} is {kind}; bundles hold regular files only"
                    )
                if name in seen:
                    raise BundleError(f"member {name!r} appears twice in {path}")
                seen.add(name)
                f = tar.extractfile(m)
                if f is None:  # pragma: no cover - regular files always have data
                    raise BundleError(f"cannot read member {name!r} of {path}")
                if name == MANIFEST_NAME:
                    manifest_bytes = f.read()
                elif name == SIGNATURE_NAME:
                    signature = f.read().decode("ascii", errors="replace").strip()
                else:
                    hashes[name] = _stream_sha256(f)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise BundleError(f"{path} is truncated or corrupt: {err}") from err
    if manifest_bytes is None:
        raise BundleError(f"{path} has no {MANIFEST_NAME}; build it with `edgefleet model package`")
    try:
        manifest = decode_manifest(manifest_bytes)
    except ProtocolError as err:
        raise BundleError(f"{MANIFEST_NAME} in {path}: {err}") from err
    try:
        bundle_format.check_listing(manifest, hashes)
    except BundleFormatError as err:
        raise BundleError(str(err)) from err
    for entry in manifest.files:
        digest, size = hashes[entry.path]
        if size != entry.size:
            raise BundleError(
                f"file {entry.path!r} has {size} bytes, the manifest says {entry.size}: "
                "the bundle was modified or damaged"
            )
        if digest != entry.sha256:
            raise BundleError(
                f"file {entry.path!r} has sha256 {digest}, the manifest says {entry.sha256}: "
                "the bundle was modified or damaged"
            )
    digest, size = file_sha256(path)
    return BundleInfo(manifest=manifest, signature=signature, sha256=digest, size=size)


def verify_signature(info: BundleInfo, keys: Sequence[Ed25519PublicKey]) -> str:
    """Return the key id of the trusted key that verifies ``info``; raise BundleError if none."""
    if not keys:
        raise BundleError("no trusted public keys given to verify the signature against")
    try:
        return bundle_format.verify_signature(info.manifest, info.signature, keys)
    except BundleFormatError as err:
        raise BundleError(str(err)) from err


def _add(tar: tarfile.TarFile, name: str, data: IO[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = ""
    tar.addfile(info, data)


def write_bundle(
    out: Path,
    manifest: Manifest,
    files: Mapping[str, Path],
    *,
    signature: str | None = None,
) -> None:
    """Write an uncompressed bundle atomically (temp file, fsync, rename); ``files`` maps
    member names to local paths and must match ``manifest.files``."""
    members: dict[str, Path] = dict(files)

    def fill(tar: tarfile.TarFile) -> None:
        body = encode_manifest(manifest)
        _add(tar, MANIFEST_NAME, io.BytesIO(body), len(body))
        if signature is not None:
            sig = (signature + "\n").encode("ascii")
            _add(tar, SIGNATURE_NAME, io.BytesIO(sig), len(sig))
        for entry in manifest.files:
            src = members[entry.path]
            with src.open("rb") as f:
                _add(tar, entry.path, f, src.stat().st_size)

    _atomic_tar(out, fill)


def _atomic_tar(out: Path, fill: Callable[[tarfile.TarFile], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_writer(out) as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        fill(tar)


def sign_bundle(path: Path, key: Ed25519PrivateKey) -> BundleInfo:
    """Check ``path``, then rewrite it atomically with ``manifest.sig`` for ``key``."""
    info = read_bundle(path)
    signature = sign_manifest(info.manifest, key)

    def fill(out_tar: tarfile.TarFile) -> None:
        body = encode_manifest(info.manifest)
        _add(out_tar, MANIFEST_NAME, io.BytesIO(body), len(body))
        sig = (signature + "\n").encode("ascii")
        _add(out_tar, SIGNATURE_NAME, io.BytesIO(sig), len(sig))
        with _open_tar(path) as src:
            for m in src:
                if m.isdir() or m.name in (MANIFEST_NAME, SIGNATURE_NAME):
                    continue
                f = src.extractfile(m)
                assert f is not None
                _add(out_tar, m.name, f, m.size)

    _atomic_tar(path, fill)
    return read_bundle(path)


# --- packaging ----------------------------------------------------------------------------

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _golden_names(images: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for i, img in enumerate(images):
        stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in img.stem) or "image"
        name = f"golden/{stem}.png"
        if name in names:
            name = f"golden/{stem}-{i}.png"
        names.append(name)
    return names


def run_local_inference(
    manifest_path: Path, images: Sequence[Path]
) -> list[list[tuple[str, float, tuple[float, float, float, float]]]]:
    """Run the model on ``images`` with the inference core; one detection list per image."""
    try:
        from inference.batch import detect_images
        from inference.errors import InferenceError
    except ImportError as err:  # numpy/OpenCV/LiteRT missing
        raise BundleError(
            f"computing golden outputs needs the inference runtime ({err}): "
            "pip install 'edgefleet[inference]', or package without --golden"
        ) from err
    try:
        found = detect_images(manifest_path, images)
    except InferenceError as err:
        raise BundleError(
            f"running the model locally on the golden images failed: {err}; check the "
            "manifest and the images with `edgefleet-agent infer --model MANIFEST IMAGE`"
        ) from err
    return [
        [(d.label, d.score, (d.box[0], d.box[1], d.box[2], d.box[3])) for d in dets]
        for dets in found
    ]


def package_model(  # noqa: PLR0912, PLR0915 - linear steps, each with its own error
    src: Path,
    *,
    out: Path,
    name: str,
    version: str,
    runtime: str | None = None,
    golden: Sequence[Path] = (),
    manifest_template: Path | None = None,
    latency_budget_ms: float | None = None,
) -> BundleInfo:
    """Build an unsigned bundle from a manifest (``src`` .json) or a model file + template.

    Files are hashed into ``manifest.files``; golden outputs come from running the model
    locally on ``golden`` (PNG images) through the inference core.
    """
    import json
    import shutil

    import msgspec

    if src.suffix == ".json":
        template_path, model_path = src, None
    else:
        if manifest_template is None:
            raise BundleError(
                f"{src} is a model file: pass --manifest-template JSON with the input, decoder "
                "and labels, or give a manifest .json instead"
            )
        template_path, model_path = manifest_template, src
    try:
        raw = json.loads(template_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read manifest {template_path}: {err}") from err
    if not isinstance(raw, dict):
        raise BundleError(f"{template_path} is not a JSON object manifest")
    base = template_path.parent
    if model_path is not None:
        raw["model"] = model_path.name
    model_name = str(raw.get("model", ""))
    sources: dict[str, Path] = {model_name: model_path or base / model_name}
    for entry in raw.get("files") or []:
        rel = str(entry.get("path", ""))
        if rel not in sources and not rel.startswith("golden/"):
            sources[rel] = base / rel
    for rel, p in sources.items():
        try:
            check_relative_path(rel)
        except ProtocolError as err:
            raise BundleError(str(err)) from err
        if not p.is_file():
            raise BundleError(f"model file {p} not found (listed as {rel!r} in {template_path})")
    golden_names = _golden_names(golden)
    for img in golden:
        try:
            head = img.read_bytes()[:8]
        except OSError as err:
            raise BundleError(f"cannot read golden image {img}: {err.strerror}") from err
        if head != _PNG_MAGIC:
            raise BundleError(f"golden image {img} is not a PNG; convert it to PNG first")
    for rel, img in zip(golden_names, golden, strict=True):
        sources[rel] = img

    raw.update(name=name, version=version, golden=[])
    if runtime is not None:
        raw["runtime"] = runtime
        raw.setdefault("compatibility", {})["runtimes"] = [runtime]
    if latency_budget_ms is not None:
        raw["latency_budget_ms"] = latency_budget_ms
    raw["files"] = []
    for rel in sorted(sources):
        digest, size = file_sha256(sources[rel])
        raw["files"].append({"path": rel, "sha256": digest, "size": size})
    try:
        manifest = decode_manifest(json.dumps(raw))
    except ProtocolError as err:
        raise BundleError(f"{template_path}: {err}") from err

    if golden:
        with tempfile.TemporaryDirectory(prefix="efb-package-") as tmp:
            stage = Path(tmp)
            for rel, p in sources.items():
                dest = stage / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dest)
            staged_manifest = stage / MANIFEST_NAME
            staged_manifest.write_bytes(encode_manifest(manifest))
            results = run_local_inference(staged_manifest, [stage / rel for rel in golden_names])
        samples = [
            {"image": rel, "expected": [list(d) for d in dets]}
            for rel, dets in zip(golden_names, results, strict=True)
        ]
        manifest = msgspec.convert({**msgspec.to_builtins(manifest), "golden": samples}, Manifest)
    write_bundle(out, manifest, sources)
    return read_bundle(out)
