"""State shared by the widgets of one napari session: the models trained in it."""

from __future__ import annotations

from pathlib import Path

from psygnal import Signal

from ..models import DEFAULT_MODEL

FROM_FILE = "from file"


class SessionModels:
    """Model files trained in this session, newest first; ``changed`` fires on each addition."""

    changed = Signal()

    def __init__(self):
        self.paths: list[Path] = []

    def add(self, path) -> None:
        path = Path(path).resolve()
        if path in self.paths:
            self.paths.remove(path)
        self.paths.insert(0, path)
        self.changed.emit()


SESSION_MODELS = SessionModels()


def model_choices(*_) -> list[tuple[str, object]]:
    """(text, value) pairs for a model picker: the bundled default, this session's models,
    and a file chosen by the user (value ``FROM_FILE``)."""
    choices: list[tuple[str, object]] = []
    if DEFAULT_MODEL.is_file():
        choices.append(("bundled default (nuclei)", DEFAULT_MODEL))
    choices += [(f"{path.name} (trained this session)", path) for path in SESSION_MODELS.paths]
    choices.append(("load from file…", FROM_FILE))
    return choices
