"""GET / (the web chat page, one self-contained file) and its tab icon."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

WEB_PAGE = Path(__file__).parent.parent / "web" / "index.html"
# the browser tab's icon: a speech bubble on the page's accent colour (browsers take SVG at this path)
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
               'fill="#2f6fde"/><path d="M3.5 4h9v6H8.2L5 12.5V10H3.5z" fill="#fff"/></svg>')
# the page's own script and style are inline; it talks only to this server
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "connect-src 'self'; img-src 'self' data:",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"), headers=PAGE_HEADERS)


@router.get("/favicon.ico", include_in_schema=False)
async def favicon():
    return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
