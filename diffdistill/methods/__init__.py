"""One file per paper: each registers its losses under the name recipes use (``method: {name: ...}``)."""

from diffdistill.methods.base import METHODS, build_method, register_method  # noqa: F401
