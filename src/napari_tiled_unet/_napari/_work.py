"""What both widgets need around their worker threads."""

from __future__ import annotations

from dataclasses import dataclass

from napari.utils import progress


@dataclass
class Failure:
    """A user error found in the worker (bad model file, wrong channels): shown as a notification."""

    message: str


class LazyProgress:
    """A napari progress bar opened at the first event, when the total is known."""

    def __init__(self, description: str):
        self.description = description
        self._bar = None
        self._opening = False

    @property
    def started(self) -> bool:
        return self._opening or self._bar is not None

    def update(self, done: int, total: int) -> None:
        if self._opening:
            return  # opening the bar runs the event loop, which delivers later events early
        if self._bar is None:
            self._opening = True
            try:
                self._bar = progress(total=total, desc=self.description)
            finally:
                self._opening = False
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def notify_errors(worker) -> None:
    """Show an unexpected error raised inside ``worker`` as a napari error notification (with
    its traceback). Workers are made with ``ignore_errors=True``: re-raised in a Qt slot, the
    error would abort napari."""

    def relay(error: BaseException) -> None:
        from napari.utils.notifications import notification_manager

        notification_manager.receive_error(type(error), error, error.__traceback__)

    worker.errored.connect(relay)
