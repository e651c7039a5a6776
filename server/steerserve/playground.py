"""The browser playground at /ui: static files shipped in the package (server/steerserve/ui/), no build step.

The page holds no data of its own: it asks for the API key and calls the authenticated API with
it (search, feature pages, chat, traces), so its files are served without a key
(`PLAYGROUND_PATHS` join the open paths of middleware/auth.py) and expose nothing the API does not.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.exceptions import HTTPException

UI_DIR = Path(__file__).resolve().parent / "ui"
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
         "favicon.svg": "image/svg+xml"}
PLAYGROUND_PATHS = ("/ui", *(f"/ui/{name}" for name in ("", *FILES)))

router = APIRouter()


@router.get("/ui", include_in_schema=False)
async def ui_root():
    return RedirectResponse("ui/")  # relative (any --root-path): the page's links resolve under /ui/


@router.get("/ui/", include_in_schema=False)
async def ui_index():
    return _file("index.html")


@router.get("/ui/{name}", include_in_schema=False)
async def ui_file(name: str):
    return _file(name)


def _file(name: str) -> FileResponse:
    if name not in FILES:  # only the shipped files, never a path into the package
        raise HTTPException(404, "no such playground file")
    return FileResponse(UI_DIR / name, media_type=FILES[name], headers={"cache-control": "no-cache"})
