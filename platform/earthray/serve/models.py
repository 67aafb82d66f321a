"""The models an app serves: each one's contract and the version clients see, checked before serving.

Every bundle is verified (``bundle.json`` and the sha256 of each weight file) when a gateway replica
starts, and by ``earthray serve`` before anything starts: a tampered or missing bundle fails the
deployment with one line naming the model, instead of an app that says ready and then answers 500.
Registry aliases are pinned to the version they name at that moment.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from earthray.config import ConfigError
from earthray.serve.config import AppArgs
from earthray.serve.inputs import ModelInfo


@dataclass(frozen=True)
class ServedModel:
    info: ModelInfo
    """The contract; ``info.source`` is where the model host loads it from (a folder, or models:/NAME/VERSION)."""
    version: str
    """What clients see as its source: models:/NAME/VERSION, or sha256:DIGEST of a folder's weights."""

    def card(self) -> dict:
        return self.info.card() | {"source": self.version}


def served_models(args: AppArgs) -> dict[str, ServedModel]:
    """Each configured model, verified; a ConfigError naming the first one that cannot be served."""
    from earthray import registry
    from earthray.bundle import BundleError, check_bundle, local_bundle

    served = {}
    for name, source in args.models.items():
        try:
            if registry.is_registry_uri(source):
                reg_name, version = registry.resolve(source, args.tracking_uri)
                source = f"{registry.SCHEME}{reg_name}/{version}"
            meta = check_bundle(local_bundle(source, args.tracking_uri))
            info = ModelInfo.from_meta(name, source, meta)
        except (BundleError, LookupError, OSError, ValueError) as e:
            raise ConfigError(f"model {name!r} ({args.models[name]}): {e}") from None
        weights = json.dumps({k: v["sha256"] for k, v in sorted(meta["weights"].items())})
        version = source if registry.is_registry_uri(source) else f"sha256:{hashlib.sha256(weights.encode()).hexdigest()[:16]}"
        served[name] = ServedModel(info, version)
    return served
