"""The connectors package stands alone: it never imports the engine."""

from __future__ import annotations

import subprocess
import sys

import connectors


def test_connectors_never_imports_provisioner() -> None:
    code = "import sys, connectors; print(sorted(m for m in sys.modules if m.split('.')[0] == 'provisioner'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


def test_the_client_and_its_policies_are_public() -> None:
    for name in ("ScimClient", "RetryPolicy", "TargetLimiter", "RateLimit", "OAuth2ClientCredentials", "TokenSource",
                 "Quirks", "Unsupported", "ResourceType", "Schema", "AttributeInfo"):  # fmt: skip
        assert name in connectors.__all__
        assert hasattr(connectors, name)
