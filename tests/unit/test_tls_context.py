"""A target's TLS context is built once per process and rebuilt when its CA bundle changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import certifi

from provisioner.config import TargetConfig
from provisioner.targets import _tls


def target(**options: object) -> TargetConfig:
    return TargetConfig.model_validate(
        {"base_url": "https://scim.example.test/v2", "auth": {"type": "none"}, "source": "hr",
         "mapping": "users.yaml", **options}  # fmt: skip
    )


def test_every_cycle_shares_one_context() -> None:
    assert _tls(target()) is _tls(target())
    assert _tls(target(verify_tls=False)) is False


def test_a_ca_bundle_edited_on_disk_is_read_again(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    shutil.copyfile(certifi.where(), bundle)
    first = _tls(target(ca_bundle=str(bundle)))
    assert _tls(target(ca_bundle=str(bundle))) is first

    bundle.write_bytes(bundle.read_bytes() + b"\n")
    stat = bundle.stat()
    os.utime(bundle, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert _tls(target(ca_bundle=str(bundle))) is not first
