"""modelserve: take trained models from the lab to production and keep them healthy there."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: ``import modelserve`` stays cheap for the CLI; user model files write ``from modelserve import PythonModel``
    if name == "PythonModel":
        from modelserve.runtime.python import PythonModel

        return PythonModel
    raise AttributeError(f"module 'modelserve' has no attribute {name!r}")


__all__ = ["PythonModel", "__version__"]
