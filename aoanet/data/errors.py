"""The one exception type of the data pipeline.

Every message names the file and, where there is one, the image id (and the field), so a user can find the bad
record without a debugger. It subclasses ValueError so callers that already catch bad-value errors keep
working, and it pickles cleanly, so an error raised in a loader worker process reaches the trainer intact.
"""


class DataError(ValueError):
    """Bad or missing input data; the message says which file, which image id and which field."""


class Problem:
    """One finding of a validation pass: which file, which image (if any), what is wrong."""

    __slots__ = ("file", "image_id", "message")

    def __init__(self, file, image_id: int | None, message: str):
        self.file, self.image_id, self.message = str(file), image_id, message

    def __str__(self) -> str:
        image = f" image id {self.image_id}:" if self.image_id is not None else ""
        return f"{self.file}:{image} {self.message}"

    def __repr__(self) -> str:
        return f"Problem({str(self)!r})"


def raise_problems(problems: list[Problem], what: str, limit: int = 20) -> None:
    """Raise one DataError listing the problems (the first ``limit`` of them), if there are any."""
    if problems:
        lines = [str(p) for p in problems[:limit]]
        if len(problems) > limit:
            lines.append(f"... and {len(problems) - limit} more (run `aoanet-data check` for the full list)")
        raise DataError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(lines))
