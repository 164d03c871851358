"""modelserve: take trained models from the lab to production and keep them healthy there."""

__version__ = "0.1.0"
