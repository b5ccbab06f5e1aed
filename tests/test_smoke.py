"""The package imports and its public surface is what __all__ says."""

import connectors
import provisioner
import provisioner.sources


def test_public_names_are_sorted_and_exist() -> None:
    for module in (connectors, provisioner, provisioner.sources):
        assert module.__all__ == sorted(module.__all__)
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
