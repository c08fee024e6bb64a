"""The font API: families, styles, files, CSS and subsets, each call metered (a subset weighs 5)."""

from __future__ import annotations

import io

import pytest
from fontTools.ttLib import TTFont

from examples.typographic.plans import METER_EVENT_NAME
from metered_middleware import BillingTarget
from tests.examples.conftest import World, api

pytestmark = pytest.mark.anyio


def _standard_target() -> BillingTarget:
    return BillingTarget(
        customer="cus_standard",
        subscription_item="si_standard",
        subscription="sub_standard",
        meter_event_name=METER_EVENT_NAME,
        period_start=1_700_000_000,
        period_end=4_000_000_000,
    )


async def _counted(world: World) -> int:
    app = world.apps[-1]
    await app.metered.flush()
    return await app.counts.period_usage(_standard_target())


async def test_families_lists_every_installed_font_package(world: World) -> None:
    """GET /v1/fonts names each family once, with its license and the package that ships it."""
    app = world.app()
    async with api(app, await world.key()) as http:
        response = await http.get("/v1/fonts")
    assert response.status_code == 200
    families = {f["family"]: f for f in response.json()["data"]}
    assert {"lato", "caladea", "source-sans-pro"} <= families.keys()
    assert families["caladea"]["license"] == "APACHE 2.0"
    assert families["lato"]["package"] == "font-lato"


async def test_family_detail_has_styles_glyphs_and_license_text(world: World) -> None:
    """GET /v1/fonts/{family} reads the fonts: weights, italics, glyph counts and the license file."""
    app = world.app()
    async with api(app, await world.key()) as http:
        detail = (await http.get("/v1/fonts/caladea")).json()
    styles = {s["style"]: s for s in detail["styles"]}
    assert set(styles) == {"regular", "italic", "bold", "bold-italic"}
    assert styles["bold-italic"] == {
        "style": "bold-italic",
        "name": "Bold Italic",
        "weight": 700,
        "italic": True,
        "glyphs": 420,
    }
    assert detail["glyphs"] == 420
    assert detail["license"]["url"] == "http://www.apache.org/licenses/LICENSE-2.0"
    assert "Apache License" in detail["license"]["text"]


async def test_font_files_are_served_as_ttf_and_woff2(world: World) -> None:
    """The same style downloads as the shipped TrueType file or compressed to WOFF2, both loadable."""
    app = world.app()
    async with api(app, await world.key()) as http:
        ttf = await http.get("/v1/fonts/caladea/regular.ttf")
        woff2 = await http.get("/v1/fonts/caladea/regular.woff2")
    assert ttf.headers["content-type"] == "font/ttf"
    assert ttf.content == app.fonts.style("caladea", "regular").path.read_bytes()  # type: ignore[union-attr]
    assert woff2.headers["content-type"] == "font/woff2"
    assert woff2.content[:4] == b"wOF2"
    assert len(woff2.content) < len(ttf.content)
    font = TTFont(io.BytesIO(woff2.content))
    assert font["maxp"].numGlyphs == 420


async def test_css_declares_a_font_face_per_style(world: World) -> None:
    """GET /v1/css gives @font-face rules pointing at the WOFF2 and TTF files of every style."""
    app = world.app()
    async with api(app, await world.key()) as http:
        response = await http.get("/v1/css", params={"family": "caladea"})
    assert response.headers["content-type"].startswith("text/css")
    css = response.text
    assert css.count("@font-face") == 4
    assert "font-weight: 700;" in css
    assert "font-style: italic;" in css
    assert "url(http://typographic/v1/fonts/caladea/bold-italic.woff2) format('woff2')" in css


async def test_subset_keeps_only_the_glyphs_of_the_text_and_counts_five(world: World) -> None:
    """A subset holds the text's glyphs (plus .notdef) and is metered with the route's weight of 5."""
    app = world.app()
    async with api(app, await world.key()) as http:
        response = await http.get("/v1/fonts/lato/subset", params={"text": "Hello", "format": "ttf"})
        await http.get("/v1/fonts")
    assert response.status_code == 200
    font = TTFont(io.BytesIO(response.content))
    assert set(font.getBestCmap()) == {ord(c) for c in "Helo"}
    assert await _counted(world) == 5 + 1


async def test_unknown_fonts_and_bad_requests_are_not_billed(world: World) -> None:
    """404s and 400s answer with a stable error code and count nothing; a missing key is a 401."""
    app = world.app()
    async with api(app, await world.key()) as http:
        missing = await http.get("/v1/fonts/comic-sans")
        bad_style = await http.get("/v1/fonts/lato/ultra.ttf")
        bad_format = await http.get("/v1/fonts/lato/regular.otf")
        no_text = await http.get("/v1/fonts/lato/subset")
    async with api(app) as anonymous:
        anonymous_response = await anonymous.get("/v1/fonts")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "font_not_found")
    assert bad_style.status_code == 404
    assert bad_format.json()["error"]["code"] == "format_unknown"
    assert (no_text.status_code, no_text.json()["error"]["code"]) == (400, "text_invalid")
    assert anonymous_response.status_code == 401
    assert anonymous_response.json()["error"]["code"] == "api_key_missing"
    assert await _counted(world) == 0


async def test_usage_reports_counts_and_the_estimated_bill(world: World) -> None:
    """GET /v1/usage shows this period's requests (none delivered yet) and the plan's estimate."""
    app = world.app()
    async with api(app, await world.key()) as http:
        for _ in range(3):
            await http.get("/v1/fonts")
        usage = (await http.get("/v1/usage")).json()
    assert usage["plan"] == "standard"
    assert usage["requests"] == {"counted": 3, "delivered": 0, "pending": 3, "failed": 0}
    assert usage["estimate"] == {"amount": 1000, "currency": "usd", "display": "$10.00"}


async def test_site_pages_are_not_metered(world: World) -> None:
    """The plan page needs no key and is never billed."""
    app = world.app()
    async with api(app) as http:
        page = await http.get("/")
    assert page.status_code == 200
    assert page.text.count('<form class="plan"') == 3
    assert "$75.00" in page.text
