"""The font catalogue: open-licensed fonts shipped by PyPI packages, read with fontTools.

Font packages built for the ``fonts`` ecosystem (``font-lato``, ``font-caladea``, ``font-source-sans-pro``...)
announce their files through the ``fonts_ttf`` entry point group: each entry point is a dict of name to
``.ttf`` path. We group the files into families by their OpenType names, so a family is what a designer
would call one, whatever the package's file naming.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Literal

from fontTools import subset as ft_subset
from fontTools.ttLib import TTFont

__all__ = ["MAX_SUBSET_TEXT", "Flavor", "FontFamily", "FontLibrary", "FontStyle", "slugify"]

ENTRY_POINT_GROUP = "fonts_ttf"
MAX_SUBSET_TEXT = 2000
_LICENSE_FILE = re.compile(r"^(OFL|LICEN[CS]E|APACHE|COPYING)[^/]*$", re.IGNORECASE)

Flavor = Literal["ttf", "woff2"]


def slugify(text: str) -> str:
    """``Source Sans Pro`` -> ``source-sans-pro``, ``Bold Italic`` -> ``bold-italic``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True, slots=True)
class FontStyle:
    """One font file of a family."""

    slug: str
    name: str
    weight: int
    italic: bool
    glyphs: int
    path: Path

    def describe(self) -> dict[str, object]:
        """The style as the API shows it."""
        return {
            "style": self.slug,
            "name": self.name,
            "weight": self.weight,
            "italic": self.italic,
            "glyphs": self.glyphs,
        }


@dataclass(frozen=True, slots=True)
class FontFamily:
    """A family: its styles and the license it is distributed under."""

    slug: str
    name: str
    package: str
    license: str
    license_url: str | None
    license_file: Path | None
    styles: dict[str, FontStyle] = field(default_factory=dict)

    @property
    def glyphs(self) -> int:
        """The largest glyph count among the styles (italics often cover fewer characters)."""
        return max(s.glyphs for s in self.styles.values())

    def summary(self) -> dict[str, object]:
        """The family as ``GET /v1/fonts`` lists it."""
        return {
            "family": self.slug,
            "name": self.name,
            "styles": len(self.styles),
            "license": self.license,
            "package": self.package,
        }

    def detail(self) -> dict[str, object]:
        """The family as ``GET /v1/fonts/{family}`` shows it."""
        styles = sorted(self.styles.values(), key=lambda s: (s.weight, s.italic, s.slug))
        return {
            "family": self.slug,
            "name": self.name,
            "package": self.package,
            "glyphs": self.glyphs,
            "license": {
                "name": self.license,
                "url": self.license_url,
                "text": self.license_file.read_text(encoding="utf-8", errors="replace")
                if self.license_file
                else None,
            },
            "styles": [s.describe() for s in styles],
        }


def _name(font: TTFont, *ids: int) -> str | None:
    table = font["name"]
    for name_id in ids:
        value = table.getDebugName(name_id)
        if value:
            return str(value).strip()
    return None


def _read_style(path: Path) -> tuple[str, FontStyle, str | None]:
    """(family name, style, license URL) of one file, from its name, OS/2 and maxp tables."""
    font = TTFont(str(path), lazy=True)
    try:
        # IDs 16/17 are the typographic family/subfamily: "Lato" + "Black Italic" rather than
        # the legacy four-style grouping "Lato Black" + "Italic".
        family = _name(font, 16, 1) or path.stem.split("-")[0]
        style_name = _name(font, 17, 2) or "Regular"
        os2 = font["OS/2"]
        italic = bool(os2.fsSelection & 1) or "italic" in style_name.lower()
        style = FontStyle(
            slug=slugify(style_name),
            name=style_name,
            weight=int(os2.usWeightClass),
            italic=italic,
            glyphs=int(font["maxp"].numGlyphs),
            path=path,
        )
        return family, style, _name(font, 14)
    finally:
        font.close()


def _license_file(directory: Path) -> Path | None:
    for candidate in sorted(directory.iterdir()):
        if candidate.is_file() and _LICENSE_FILE.match(candidate.name):
            return candidate
    return None


class FontLibrary:
    """The families found in installed font packages, with their files served as TTF, WOFF2 or subsets."""

    def __init__(self, families: Iterable[FontFamily]) -> None:
        self.families: dict[str, FontFamily] = {f.slug: f for f in families}

    @classmethod
    def discover(cls, group: str = ENTRY_POINT_GROUP) -> FontLibrary:
        """Every family announced through the ``fonts_ttf`` entry points of installed packages."""
        families: dict[str, FontFamily] = {}
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            files: Mapping[str, str] = ep.load()
            dist = ep.dist
            package = dist.name if dist is not None else ep.module
            declared = dist.metadata.get_all("License") if dist is not None else None
            license_name = declared[0] if declared else "see the license file"
            for raw_path in sorted(files.values()):
                path = Path(raw_path)
                family_name, style, license_url = _read_style(path)
                slug = slugify(family_name)
                family = families.get(slug)
                if family is None:
                    family = families[slug] = FontFamily(
                        slug=slug,
                        name=family_name,
                        package=package,
                        license=license_name,
                        license_url=license_url,
                        license_file=_license_file(path.parent),
                    )
                family.styles.setdefault(style.slug, style)
        return cls(families[k] for k in sorted(families))

    def family(self, slug: str) -> FontFamily | None:
        """A family by its slug."""
        return self.families.get(slug)

    def style(self, family: str, style: str) -> FontStyle | None:
        """A style of a family, by slugs."""
        found = self.families.get(family)
        return None if found is None else found.styles.get(style)

    def file(self, style: FontStyle, flavor: Flavor) -> bytes:
        """The style's font file as TTF (as shipped) or WOFF2 (compressed once, then cached)."""
        if flavor == "ttf":
            return style.path.read_bytes()
        return _woff2(style.path)

    def subset(self, style: FontStyle, text: str, flavor: Flavor = "woff2") -> bytes:
        """A font holding only the glyphs ``text`` needs (plus .notdef), as WOFF2 or TTF."""
        options = ft_subset.Options()
        options.flavor = None if flavor == "ttf" else "woff2"
        options.layout_features = ["*"]  # keep kerning and ligatures between the kept glyphs
        options.drop_tables += ["FFTM"]  # FontForge's timestamps: nothing to subset, and fontTools warns
        font = TTFont(str(style.path))
        try:
            subsetter = ft_subset.Subsetter(options)
            subsetter.populate(text=text)
            subsetter.subset(font)
            out = io.BytesIO()
            font.flavor = options.flavor
            font.save(out)
        finally:
            font.close()
        return out.getvalue()


@lru_cache(maxsize=64)
def _woff2(path: Path) -> bytes:
    font = TTFont(str(path))
    try:
        font.flavor = "woff2"
        out = io.BytesIO()
        font.save(out)
    finally:
        font.close()
    return out.getvalue()
