"""The one exception the data pipeline raises for problems the user must fix."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data or a mismatch between files; the message is one line naming the file
    (and the line number when there is one), so a CLI can print it as is and exit 1."""
