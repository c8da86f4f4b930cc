"""A small HTTP client of the faceforge API (``faceforge generate``): standard library only."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from serve.settings import TOKEN_ENV


class ClientError(Exception):
    """The server refused the request or could not be reached; the message says why."""


def _png_b64(path: str | Path, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    return base64.b64encode(path.read_bytes()).decode()


def request_json(url: str, path: str, body: dict | None = None, token: str | None = None, timeout: float = 600) -> dict:
    """GET (no body) or POST JSON to ``url + path``; the decoded JSON answer, or ``ClientError``."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    token = token or os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read()).get("detail")
        except (ValueError, AttributeError):
            detail = error.reason
        retry = error.headers.get("Retry-After")
        raise ClientError(f"{error.code}: {detail}" + (f" (retry after {retry} s)" if retry else "")) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise ClientError(f"cannot reach {url}: {reason}; is `faceforge serve` running there?") from None


def generate(
    url: str,
    out: str | Path,
    prompt: str = "",
    mask: str | Path | None = None,
    sketch: str | Path | None = None,
    n: int = 1,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    model: str | None = None,
    token: str | None = None,
) -> dict:
    """Ask the server for ``n`` images and write them to ``out/<seed>.png``; returns the answer's metadata."""
    body: dict = {"prompt": prompt, "n": n}
    for key, value in (("seed", seed), ("steps", steps), ("guidance", guidance), ("model", model)):
        if value is not None:
            body[key] = value
    if mask is not None:
        body["mask"] = _png_b64(mask, "--mask")
    if sketch is not None:
        body["sketch"] = _png_b64(sketch, "--sketch")
    answer = request_json(url, "/v1/generate", body, token)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for seed_used, image in zip(answer["seeds"], answer["images"]):
        path = out / f"{seed_used}.png"
        path.write_bytes(base64.b64decode(image))
        files.append(str(path))
    return {k: v for k, v in answer.items() if k != "images"} | {"files": files}
