"""``faceforge serve``: the Serve application on this machine, bound to 127.0.0.1, until Ctrl-C or SIGTERM.

The caller starts a private local Ray first and stops it afterwards (``pipelines.ray_runtime``); this module
binds Serve's HTTP proxy to loopback, deploys the application, warms the default model, and on SIGINT/SIGTERM
shuts Serve down (bounded in time: a Ctrl-C in a terminal also reaches Ray's own processes, and a shutdown
that waits on a dead controller would never return).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

APP_NAME = "faceforge"


def serve_forever(port: int, settings: dict, ready_timeout_s: float = 600.0, stop_timeout_s: float = 8.0) -> int:
    from ray import serve

    from serve.app import build_app
    from serve.registry import Registry
    from serve.settings import ServeSettings

    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            return
        stop.set()
        raise KeyboardInterrupt  # unblocks serve.run / the wait below in the main thread

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.perf_counter()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        parsed = ServeSettings.from_dict(settings)
        default = parsed.default_model
        try:
            ref = Registry(parsed.tracking_uri).resolve(default) if default else None
        except LookupError as error:
            print(f"faceforge: default model: {error}", file=sys.stderr)
            ref = None
        if ref is not None:
            # load the default model now, so the first request does not pay for it
            handle = serve.get_deployment_handle("FaceModel", app_name=APP_NAME)
            info = handle.options(multiplexed_model_id=ref.id).describe.remote().result(timeout_s=ready_timeout_s)
            print(f"faceforge: {ref.id} loaded ({info['arch']}, {info['size']} px, {info['default_steps']} steps)")
        print(
            f"faceforge: serving on http://127.0.0.1:{port}  (page /, API /v1/generate, docs /docs) "
            f"ready in {time.perf_counter() - started:.0f} s; Ctrl-C stops",
            flush=True,
        )
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("faceforge: stopping the server", file=sys.stderr, flush=True)
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not abort the shutdown half-way
        stopper = threading.Thread(target=serve.shutdown, daemon=True)
        stopper.start()
        stopper.join(stop_timeout_s)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
