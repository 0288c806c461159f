"""Errors of the export, each with a message meant for the user of ``aoanet-export``."""

from __future__ import annotations


class ExportError(RuntimeError):
    """The export could not be produced; the output directory was left as it was."""


class ParityError(ExportError):
    """The exported graphs do not reproduce the Paddle model within the tolerance."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report
