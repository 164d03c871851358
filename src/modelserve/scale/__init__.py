"""Deployment artifacts for modelserve: Kubernetes manifests (``k8s.py``); the Dockerfile is at the repository root.

Nothing here talks to a cluster: it renders YAML that ``kubectl apply`` (or GitOps) takes from there.
"""

from modelserve.scale.k8s import K8sOptions, render, write

__all__ = ["K8sOptions", "render", "write"]
