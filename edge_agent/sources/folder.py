"""Still images from a folder or a glob pattern, in sorted order, optionally looping.

Why re-glob on open (and not watch the folder): the reopen wrapper closes and reopens the source
when it fails, so a folder that was renamed away and back, or refilled, is picked up on the next
open without inotify. A file that cannot be decoded is skipped with one warning and counted
(``skipped``); a whole pass with nothing readable is a ``SourceError`` (so the wrapper backs off
instead of spinning).
"""

from __future__ import annotations

import logging
import time
from typing import List, Optional, Set


from edge_agent.errors import SourceError
from edge_agent.sources.images import IMAGE_EXTENSIONS, list_images, read_scaled
from edge_agent.sources.base import BaseSource, Captured, EndOfStream, Pacer, SourceSettings

log = logging.getLogger(__name__)

class FolderSource(BaseSource):
    kind = "folder"
    live = False  # every image is processed

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        self._files: List[str] = []
        self._index = 0
        self._good_this_pass = 0
        self._warned: Set[str] = set()
        self._pacer = Pacer(settings.fps)

    def _listing(self) -> List[str]:
        files = list_images(self.settings.uri)
        if not files:
            raise SourceError(
                f"no images in {self.settings.uri!r} (looked for {', '.join(IMAGE_EXTENSIONS)}; source.uri)"
            )
        return files

    def preflight(self) -> List[str]:
        try:
            self._listing()
        except SourceError as exc:
            return [str(exc)]
        return []

    def open(self) -> None:
        files = self._listing()
        self._files = files
        self._index = 0
        self._good_this_pass = 0
        log.info("folder source: %d images from %s", len(files), self.settings.uri)

    def close(self) -> None:
        self._files = []

    def _read(self, timeout: float) -> Optional[Captured]:
        if not self._files:
            raise SourceError("folder source is not open")
        if not self._pacer.wait(timeout):
            return None
        # At most one full pass per call, so a folder of unreadable files cannot spin forever.
        for _ in range(len(self._files)):
            if self._index >= len(self._files):
                self._start_new_pass()
            path = self._files[self._index]
            self._index += 1
            image, size = read_scaled(path, self.decode_hint)  # reduced JPEG decode when hinted
            if image is not None:
                self._good_this_pass += 1
                return Captured(image, time.time(), time.monotonic(), size)
            self._skip(path)
        if self._index >= len(self._files):
            self._start_new_pass()
        return None

    def _start_new_pass(self) -> None:
        if self._good_this_pass == 0:
            raise SourceError(f"no readable image left in {self.settings.uri!r}")
        if not self.settings.loop:
            raise EndOfStream(self.name)
        self._index = 0
        self._good_this_pass = 0

    def _skip(self, path: str) -> None:
        self.skipped += 1
        if path not in self._warned:
            self._warned.add(path)
            log.warning("folder source: skipping unreadable image %s", path)


BACKEND = FolderSource
