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


def find_example(models: dict, reference: str | None, k: int) -> tuple[str, dict]:
    """(the version's id, its example ``k``) from a ``GET /v1/models`` answer; ``reference`` as the API takes it
    (``NAME/VERSION``, ``NAME@ALIAS``, ``NAME`` = newest, None = the server's default)."""
    versions = {v["id"]: v for m in models["models"] for v in m["versions"]}
    newest = {m["name"]: m["versions"][-1]["id"] for m in models["models"] if m["versions"]}
    aliases = {f"{m['name']}@{a}": f"{m['name']}/{n}" for m in models["models"] for a, n in m["aliases"].items()}
    chosen = reference or models.get("default")
    version_id = versions.get(chosen, {}).get("id") or aliases.get(chosen) or newest.get(chosen)
    if version_id is None:
        raise ClientError(f"model {chosen!r} is not registered on the server; known: {', '.join(versions) or 'none'}")
    examples = versions[version_id].get("examples") or []
    if not 0 <= k < len(examples):
        have = f"examples 0..{len(examples) - 1}" if examples else "no examples (publish it again with faceforge)"
        raise ClientError(f"--example {k}: {version_id} has {have}")
    return version_id, examples[k]


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
    example: int | None = None,
) -> dict:
    """Ask the server for ``n`` images and write them to ``out/<seed>.png``; returns the answer's metadata.
    ``example`` K: the model's example K (``GET /v1/models``) gives the mask and, unless ``prompt`` is set, the
    caption, as a click on its thumbnail does on the page."""
    body: dict = {"prompt": prompt, "n": n}
    if example is not None:
        if mask is not None or sketch is not None:
            raise ClientError("--example gives the mask; leave out --mask and --sketch")
        version, chosen = find_example(request_json(url, "/v1/models", token=token), model, example)
        body |= {"model": version, "mask": chosen["mask"], "prompt": prompt or chosen["caption"]}
        model = None
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
