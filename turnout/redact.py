"""Secrets never reach a record: what turnout writes or prints passes through here.

A record is anything that outlives the process or leaves the machine: the config
saved in a checkpoint and in the MLflow run (and its params), the summary and the
command line's error lines, the tracebacks and logs turnout writes. The secrets are
of two kinds:

- credentials inside a URL (``https://user:pass@host``, ``postgresql://u:p@db/x``): the
  ``user:pass@`` part is dropped (:func:`strip_credentials`), so a saved config still
  names the store, and the credentials come from the environment again
  (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), as docs/security.md says;
- the values of the environment variables in :data:`SECRET_ENV` (Ray's token, MLflow's
  password and token, Hugging Face tokens): any occurrence becomes ``***``
  (:func:`redact`), wherever it stands in the text.
"""

from __future__ import annotations

import os
import re

#: Environment variables whose values are secrets wherever they appear.
SECRET_ENV = (
    "RAY_AUTH_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH_PASSWORD",
    "DATABRICKS_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
MASK = "***"
# scheme://userinfo@ : userinfo holds no '/', '@' or whitespace.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
# Shorter values are not treated as secrets: masking '1' would garble every number.
_MIN_SECRET_CHARS = 6


def strip_credentials(text: str) -> str:
    """``text`` with the ``user:pass@`` part of every URL in it removed."""
    return _USERINFO.sub(r"\g<scheme>", text)


def secret_values() -> list[str]:
    """The secrets set in this process's environment, longest first."""
    found = {os.environ.get(name, "").strip() for name in SECRET_ENV}
    return sorted((v for v in found if len(v) >= _MIN_SECRET_CHARS), key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` without URL credentials and without any value of :data:`SECRET_ENV`."""
    out = strip_credentials(text)
    for value in secret_values():
        out = out.replace(value, MASK)
    return out
