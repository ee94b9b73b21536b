"""The end-of-run figures."""

from __future__ import annotations

import os
import unicodedata
import warnings
from pathlib import Path

import matplotlib.colors
import matplotlib.figure
import numpy as np
import pytest
from matplotlib import font_manager
from PIL import Image

from training.report import (
    display_width,
    fonts_for,
    per_class_lines,
    plot_confusion,
    write_text_atomic,
)


def _ink_on_the_border(path: Path) -> bool:
    """Whether any non-white pixel touches the image's edge: text cut off by the canvas."""
    pixels = np.asarray(Image.open(path).convert("L"))
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return bool((edges < 250).any())


@pytest.mark.parametrize(
    "classes",
    [
        ["a-rather-long-class-name", "b"],
        ["cat", "dog", "zebra 2"],
        [f"class {i}" for i in range(12)],
    ],
    ids=["two-classes-long-name", "three-classes", "twelve-classes"],
)
def test_confusion_matrix_is_not_cut_off(tmp_path: Path, classes: list[str]) -> None:
    """With few classes the figure was sized for the matrix alone: the title, the axis labels
    and long class names were cut off at its edges."""
    n = len(classes)
    confusion = [[3 if i == j else 1 for j in range(n)] for i in range(n)]
    path = tmp_path / "confusion.png"
    plot_confusion(path, confusion, classes, "AlexNet, recipe fast: test 87.50%")
    assert not _ink_on_the_border(path)


def test_class_names_with_dollar_signs_are_drawn_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'$' started matplotlib's math mode: 'US$ vs CA$' came out in italics, and 'cost$_$'
    raised (after the test evaluation: the run could never finish)."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    classes = ["cost$_$", "US$ vs CA$", "$$"]
    plot_confusion(tmp_path / "confusion.png", [[1, 0, 0], [0, 1, 0], [0, 0, 1]], classes, "$t$")
    (ax,) = figures[0].axes
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [label.get_text() for label in labels] == classes
        assert not any(label.get_parse_math() for label in labels)


def _luminance(rgba: tuple[float, ...]) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


@pytest.mark.parametrize(
    "confusion",
    [[[5, 3], [3, 5]], [[3, 3], [3, 3]], [[40, 0, 1], [2, 37, 3], [0, 5, 30]]],
    ids=["no-zero-cell", "uniform", "typical"],
)
def test_confusion_counts_are_legible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, confusion: list[list[int]]
) -> None:
    """Each count's colour contrasts with its cell. The colour scale started at the smallest
    count, not at 0: in a small test set where every cell is above half the largest, the
    smallest cells were drawn near white and their counts in white."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    classes = [f"c{i}" for i in range(len(confusion))]
    plot_confusion(tmp_path / "confusion.png", confusion, classes, "title")
    (ax,) = figures[0].axes
    (image,) = ax.get_images()
    counts = [t for t in ax.texts if t.get_text().isdigit()]
    assert len(counts) == len(confusion) ** 2
    for text in counts:
        j, i = (round(v) for v in text.get_position())
        cell = image.to_rgba(confusion[i][j])
        ink = matplotlib.colors.to_rgba(text.get_color())
        assert abs(_luminance(cell) - _luminance(ink)) > 0.4, (i, j, confusion[i][j])


def test_per_class_percentages_line_up_in_terminal_columns_for_wide_names() -> None:
    """Class folders named in Chinese, Japanese or Korean take two terminal columns a
    character; padding by characters pushed their percentages out of the column."""
    per_class = {"猫": 50.0, "자동차": 100.0, "cafe\u0301": 7.5, "dog": 0.0, "飛行機と船と車": 12.5}
    lines = per_class_lines(per_class)
    assert [line[-7:] for line in lines] == [f"{acc:6.2f}%" for acc in per_class.values()]
    # Every percentage starts in one column: after the widest name (7 wide characters).
    assert {display_width(line[:-7]) for line in lines} == {2 + 14 + 1}, lines
    assert display_width("自動車 car") == 10 and display_width("cafe\u0301") == 4
    # Zero-width marks that are not "combining" to unicodedata: a Thai vowel sign, and the
    # vowel and final jamo of Hangul in decomposed form (as macOS stores folder names).
    assert display_width("หมี") == 2
    assert display_width(unicodedata.normalize("NFD", "자동차")) == 6 == display_width("자동차")
    assert display_width("cat\tdog") == 6  # a control character takes no column of its own


SCRIPT_LETTER = "\u210a"  # SCRIPT SMALL G: not in DejaVu Sans, in matplotlib's own STIX fonts


def test_class_names_fall_back_to_an_installed_font_that_has_their_characters(
    tmp_path: Path,
) -> None:
    """matplotlib falls back glyph by glyph only through the families it is given, and was
    given DejaVu Sans alone: a name in another script was drawn as boxes."""
    families, absent = fonts_for(["cat", SCRIPT_LETTER])
    assert families[0] == "DejaVu Sans" and len(families) > 1 and absent == ""
    _draw_without_missing_glyphs(f"cat {SCRIPT_LETTER}", families, tmp_path)


def _draw_without_missing_glyphs(text: str, families: list[str], tmp_path: Path) -> None:
    with matplotlib.rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" fails the test
        fig = matplotlib.figure.Figure()
        fig.text(0.5, 0.5, text)
        fig.savefig(tmp_path / "text.png")


def test_characters_said_to_be_drawable_are_drawn(tmp_path: Path) -> None:
    """A family name may cover several files with different glyphs (a bold or condensed
    variant, a system copy beside matplotlib's own): the characters of the first file listed
    under it were taken as the family's, and these two were then drawn as boxes, silently."""
    text = "\u037f\ua698"  # GREEK CAPITAL LETTER YOT, CYRILLIC CAPITAL LETTER DOUBLE O
    families, absent = fonts_for([text])
    drawable = "".join(c for c in text if c not in absent)
    _draw_without_missing_glyphs(drawable, families, tmp_path)


def test_font_lookups_log_nothing_while_drawing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fallback family without a regular weight made matplotlib log a warning at each lookup
    ("findfont: Failed to find font weight normal for DejaVu Serif Condensed, now using 380"),
    in the log of every run whose class names needed it."""
    # matplotlib caches lookups, and logs only when it looks: an earlier test would hide it.
    font_manager.FontManager._findfont_cached.cache_clear()
    # Ꚙ is in DejaVu Serif Condensed (regular weight 380) where fonts-dejavu-extra is installed.
    classes = ["\u037f", "\ua698"]
    plot_confusion(tmp_path / "confusion.png", [[1, 0], [0, 1]], classes, "test")
    assert [r.message for r in caplog.records if "findfont" in r.message] == []
    assert (tmp_path / "confusion.png").exists()


def test_characters_that_no_font_has_are_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each missing character was a UserWarning of its own, at the end of every run."""
    fonts = font_manager.fontManager.ttflist
    monkeypatch.setattr(
        font_manager.fontManager, "ttflist", [f for f in fonts if f.name == "DejaVu Sans"]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(tmp_path / "confusion.png", [[1, 0], [0, 1]], ["猫", "犬"], "test")
    assert [str(w.message) for w in caught] == []
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "confusion.png" in record.message and "犬 猫" in record.message
    assert (tmp_path / "confusion.png").exists()


@pytest.mark.parametrize(
    "message",
    [
        "Glyph 29483 (\\N{CJK UNIFIED IDEOGRAPH-732B}) missing from font(s) DejaVu Sans.",
        # matplotlib before 3.9 (3.8 is the oldest pyproject.toml admits)
        "Glyph 29483 (\\N{CJK UNIFIED IDEOGRAPH-732B}) missing from current font.",
    ],
)
def test_both_wordings_of_matplotlibs_missing_glyph_warning_are_silenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    """The filter matched only the newer wording: with matplotlib 3.8, every missing
    character was still a UserWarning of its own."""
    import training.report as report

    def draws_with_a_missing_glyph(*args: object) -> None:
        warnings.warn(message, UserWarning, stacklevel=1)

    monkeypatch.setattr(report, "_draw_confusion", draws_with_a_missing_glyph)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(tmp_path / "confusion.png", [[1, 0], [0, 1]], ["猫", "犬"], "test")
    assert [str(w.message) for w in caught] == []


def test_a_matplotlibrc_naming_fonts_not_installed_still_draws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """font.sans-serif listing only absent fonts made fonts_for raise, ending the run before
    summary.json and confusion.png."""
    monkeypatch.setitem(matplotlib.rcParams, "font.sans-serif", ["NoSuchFont"])
    families, absent = fonts_for(["cat"])
    assert families and absent == ""
    plot_confusion(tmp_path / "confusion.png", [[1, 0], [0, 1]], ["cat", "dog"], "test")
    assert (tmp_path / "confusion.png").exists()


def test_write_text_atomic_replaces_what_a_link_names_and_writes_where_it_cannot_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename replaced a link itself (the file it named kept its old text); a folder this
    process cannot write has no room for the temporary file, though the file is writable."""
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]

    folder_writable = os.access
    monkeypatch.setattr(
        "training.report.os.access",
        lambda p, mode: Path(p) != tmp_path and folder_writable(p, mode),
    )
    monkeypatch.setattr("training.report.os.replace", lambda *a: pytest.fail("renamed"))
    write_text_atomic(real, "newer")
    assert real.read_text() == "newer"
