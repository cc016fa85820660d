"""The example record every data source produces, and the error raised for bad data."""

from __future__ import annotations

from dataclasses import dataclass

from prelort.errors import UserError


class DataError(UserError):
    """Bad data or a bad data request; the message is one line saying what to fix."""


@dataclass(frozen=True)
class Example:
    """One training / evaluation example.

    Attributes
    ----------
    prompt:
        The instruction (task definition) and input text, already joined.
    target:
        The reference answer the model is trained to produce.
    references:
        All accepted answers; ROUGE-L takes the best over them.
    choices:
        Candidate answers for classification / multiple choice (empty otherwise).
    answer:
        Index of the correct entry of ``choices``, or None.
    category:
        Label name, task name or category, used for non-IID splits.
    history:
        Earlier turns of a chat (``(role, content)`` pairs: system, user, assistant) before the
        final user turn ``prompt``; empty for single-turn data.
    """

    prompt: str
    target: str
    references: tuple[str, ...]
    choices: tuple[str, ...] = ()
    answer: int | None = None
    category: str = ""
    history: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.references:
            raise DataError("Example.references is empty; pass at least the target answer")
        if self.answer is not None and not 0 <= self.answer < len(self.choices):
            raise DataError(
                f"Example.answer={self.answer} is not an index into its "
                f"{len(self.choices)} choices; fix the answer or the choices"
            )
