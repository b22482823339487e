"""`stoker dashboard`'s live view of the searches and runs under a storage directory.

One port serves three things:
- `/stoker`: the overview (written here, since no library lists stoker's runs and searches):
  every search with its trials done / stopped / running and best so far, every run with its
  epoch, samples/s and ETA; the page polls `/stoker/api/overview`.
- `/dashboard`, `/api`: optuna-dashboard (a maintained library) over an in-memory Optuna
  storage holding one study per search, replayed from the searches' logs
  (`stoker.tune.search_log`): the trials table, best so far over time, learning curves
  (intermediate values), parameter importance and parallel coordinates, updated live.
- `/tensorboard`: TensorBoard over the same directory, for the runs' learning curves (every run
  writes TensorBoard event files).

A background thread looks at the directory every `refresh_s`: new searches and runs, and the
lines appended to each search's log since the last look. Nothing here writes to the storage.
"""

import json
import logging
import socketserver
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from optuna.storages import InMemoryStorage

from stoker.cluster.dashboard_page import PAGE
from stoker.trainer.run_dir import Records
from stoker.tune.progress import read_progress
from stoker.tune.search_log import LOG_FILE, LiveStudy
from stoker.tune.warm_start import EXPERIMENT_FILE

log = logging.getLogger(__name__)


def find(root: Path) -> tuple[list[Path], list[Path]]:
    """(searches, runs) directly under `root`: an experiment directory holds its Tune state file,
    a run directory its config.yaml (a search's trials' runs live inside the experiment)."""
    searches, runs = [], []
    for child in sorted(root.iterdir()):
        if (child / EXPERIMENT_FILE).is_file() or (child / LOG_FILE).is_file():
            searches.append(child)
        elif Records(child).exists():
            runs.append(child)
    return searches, runs


@dataclass
class Catalog:
    """What the overview and optuna-dashboard show, refreshed from the directory."""

    root: Path
    storage: InMemoryStorage = field(default_factory=InMemoryStorage)
    studies: dict[Path, LiveStudy] = field(default_factory=dict)
    overview: dict[str, Any] = field(default_factory=lambda: {"searches": [], "runs": []})

    def refresh(self) -> None:
        searches, runs = find(self.root)
        for path in searches:
            if path not in self.studies and (path / LOG_FILE).is_file():
                self.studies[path] = LiveStudy(self.storage, path / LOG_FILE)
            if path in self.studies:
                self.studies[path].refresh()
        self.overview = {"searches": [self._search(path) for path in searches],
                         "runs": [self._run(path) for path in runs]}

    def _search(self, path: Path) -> dict[str, Any]:
        study = self.studies.get(path)
        return {"name": path.name, "progress": read_progress(path),
                "study": study.study_id if study else None, "damaged": study.damaged if study else 0}

    @staticmethod
    def _run(path: Path) -> dict[str, Any]:
        records = Records(path)
        final = records.final()
        # The best epoch's scores (final_metrics.json also holds the confusion matrix and such).
        best = {f"{prefix}_{name}": value
                for prefix, split in (("val", "validation"), ("test", "test"))
                for name, value in ((final or {}).get(split) or {}).items() if isinstance(value, int | float)}
        return {"name": path.name, "progress": records.progress(), "finished": final is not None, "best": best}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # every poll would be a line otherwise
        log.debug(format, *args)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def tensorboard_app(logdir: Path, reload_s: float):
    """TensorBoard's WSGI app over `logdir`, mounted at /tensorboard. TensorBoard's own
    `server_class` hook hands over the app instead of serving it on a port of its own."""
    from tensorboard import default, program

    handed: list = []

    class _Handover(program.TensorBoardServer):
        def __init__(self, wsgi_app, flags) -> None:
            handed.append(wsgi_app)

        def serve_forever(self) -> None:
            pass

        def get_url(self) -> str:
            return "/tensorboard/"

    board = program.TensorBoard(plugins=default.get_plugins(), server_class=_Handover)
    # load_fast=false: the Python loader in this process, not the Rust data server's subprocess.
    board.configure(logdir=str(logdir), path_prefix="/tensorboard", reload_interval=reload_s, load_fast="false")
    board.launch()
    return handed[0]


def build_app(catalog: Catalog, tensorboard: Any | None):
    """The one WSGI app: the overview, TensorBoard, and optuna-dashboard for the rest."""
    from optuna_dashboard import wsgi

    studies = wsgi(catalog.storage)
    page = PAGE.encode()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path in ("/", ""):
            start_response("302 Found", [("Location", "/stoker")])
            return [b""]
        if path.rstrip("/") == "/stoker":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [page]
        if path == "/stoker/api/overview":
            start_response("200 OK", [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
            return [json.dumps(catalog.overview, default=str).encode()]
        if path.startswith("/tensorboard") and tensorboard is not None:
            return tensorboard(environ, start_response)
        return studies(environ, start_response)

    return app


def serve(root: Path, host: str, port: int, refresh_s: float = 2.0, with_tensorboard: bool = True,
          ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Serve the view of `root` until `stop` is set (or the process is interrupted). Raises
    OSError when the port cannot be bound."""
    catalog = Catalog(root)
    catalog.refresh()
    tensorboard = tensorboard_app(root, max(refresh_s, 5.0)) if with_tensorboard else None
    server = make_server(host, port, build_app(catalog, tensorboard), server_class=_ThreadingServer,
                         handler_class=_QuietHandler)
    stop = stop or threading.Event()

    def watch() -> None:
        while not stop.wait(refresh_s):
            try:
                catalog.refresh()
            except OSError as error:  # a directory removed while read: the next look sees
                log.warning("dashboard: reading %s: %s", root, error)

    threading.Thread(target=watch, name="stoker-dashboard-refresh", daemon=True).start()
    threading.Thread(target=lambda: (stop.wait(), server.shutdown()), daemon=True).start()
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        stop.set()
        server.server_close()
