"""The model registry: models, versions, aliases, lineage and history in a database (SQLite by default,
PostgreSQL by URL), artifacts content-addressed in a store (a local folder by default, S3 by URL).

    from modelserve.registry import Registry
    reg = Registry.from_settings()                      # MODELSERVE_REGISTRY_* or the embedded defaults
    v = reg.register("net-int8.onnx", "resnet", from_version=1, step="quantize")
    reg.set_alias("resnet", "production", v.version)    # every server following the alias swaps
    reg.rollback("resnet", "production")                # one step back, recorded in the history
"""

from modelserve.registry.info import (
                                      AliasInfo,
                                      HistoryInfo,
                                      ModelDetail,
                                      ModelSummary,
                                      ServedVersion,
                                      ServingTarget,
                                      VersionInfo,
)
from modelserve.registry.registry import ProtectedAlias, Registry
from modelserve.registry.store import ArtifactStore, DigestMismatch, file_digest

__all__ = ["AliasInfo", "ArtifactStore", "DigestMismatch", "HistoryInfo", "ModelDetail", "ModelSummary",
           "ProtectedAlias", "Registry", "ServedVersion", "ServingTarget", "VersionInfo", "file_digest"]
