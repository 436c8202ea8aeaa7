"""GET /: the search page, and GET /page/{name}: its script and style sheet.

Plain HTML, JS and CSS shipped in the package (serving/static/): no build step, no CDN, no external
font, so it works offline and behind a firewall. The page calls the public API (POST /search, by image
or by key, and GET /thumbnail/{key}) with the token the user types, so it needs no privileges of its
own and is served without a token. A server without an index serves a page saying how to add one.
The Content-Security-Policy allows this origin only (and blob: images, the fetched thumbnails).
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from serving.requests import RequestError

PAGE_DIR = Path(__file__).with_name("static")
ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}  # the only files /page/ serves
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidated, so a new release's page is picked up
}


@cache
def page_text(name: str) -> str:
    return (PAGE_DIR / name).read_text(encoding="utf-8")


def page_html(model_name: str, dim: int, has_index: bool) -> str:
    """The page's shell naming the served model, around the search or the note saying how to add an index."""
    main = page_text("search.html" if has_index else "no-index.html")
    return page_text("page.html").replace("__MODEL__", html.escape(f"{model_name} (dim {dim})")).replace("__MAIN__", main)


async def page(request: Request) -> HTMLResponse:
    import bentoml

    service = bentoml.get_current_service()
    return HTMLResponse(page_html(service.name, service.dim, service.search_index is not None),
                        headers=SECURITY_HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:  # a fixed set: no path from the request reaches the file system
        return RequestError(404, "not_found", f"no page asset {name[:80]!r}").response()
    return Response(page_text(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)
