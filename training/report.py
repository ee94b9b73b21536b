"""What a user watches: the per-epoch line, the metrics file, and the end-of-run figures."""

from __future__ import annotations

import json
import logging
import os
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {m['epoch']:>{len(str(epochs))}}/{epochs}  loss {m['train_loss']:.4f}  "
        f"train {m['train_acc']:6.2f}%  val {m['val_acc']:6.2f}%  lr {m['lr']:.3g}  "
        f"{m['images_per_s']:,.0f} img/s  epoch {m['epoch_s']:.1f}s  elapsed {m['elapsed_s']:.1f}s"
    )


def display_width(text: str) -> int:
    """Terminal columns, by wcwidth: wide characters (Chinese, Japanese, Korean) take two;
    combining marks, Thai vowel signs and decomposed Hangul's vowel and final jamo (names from
    macOS folders are often decomposed) take none."""
    # Imported here: the trainer imports this module, and training needs nothing beyond
    # torch's stack (bench.gpu_session runs it on machines with only that installed).
    import wcwidth

    width = wcwidth.wcswidth(text)
    if width >= 0:
        return width
    return sum(max(wcwidth.wcwidth(c), 0) for c in text)  # -1: control characters take none


def per_class_lines(per_class: dict[str, float]) -> list[str]:
    """One '  <class>  <accuracy>%' line per class, for the command lines that print a report.
    The names are padded to the widest (12 columns at least), so the percentages stay in one
    column when class folders have long names, or names in wide characters."""
    width = max([12, *map(display_width, per_class)])
    return [
        f"  {name}{' ' * (width - display_width(name))} {acc:6.2f}%"
        for name, acc in per_class.items()
    ]


def write_text_atomic(path: Path, text: str) -> None:
    """The whole text or the file as it was: a full disk or a kill mid-write leaves no half.

    Through a symbolic link the file it names is replaced, not the link. A target that is not
    a regular file (/dev/stdout), or a file in a folder this process cannot write (no room for
    the temporary file beside it), is written in place."""
    path = Path(os.path.realpath(path))
    if (path.exists() and not path.is_file()) or not os.access(path.parent, os.W_OK):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    """JSON lines, one per epoch, rewritten whole: after a resume it matches the checkpoint."""
    write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in metrics))


def plot_curves(path: Path, metrics: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], marker="o", ms=3, label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy (epoch mean)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.plot(epochs, [m["train_acc"] for m in metrics], marker="o", ms=3, label="train")
    ax_acc.plot(epochs, [m["val_acc"] for m in metrics], marker="o", ms=3, label="validation")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fonts_for(texts: Iterable[str]) -> tuple[list[str], str]:
    """Font families that draw `texts`: matplotlib's default, then installed fonts with the
    characters it lacks; and the characters that no installed font has.

    Class names come from folder names, in any script. matplotlib draws each character with
    the first listed family that has it, but lists only its default (DejaVu Sans: Latin,
    Greek, Cyrillic), so a Chinese or Japanese name was a row of boxes even where a font for it
    was installed, and a warning for each character."""
    from matplotlib import font_manager, ft2font

    def drawn_with(family: str) -> str:
        """The file matplotlib draws this family's regular text with: a family name may cover
        several files (bold, or a system copy beside matplotlib's own), with other glyphs."""
        props = font_manager.FontProperties(family=[family])
        return font_manager.findfont(props, fallback_to_default=False)

    def characters(path: str) -> set[int]:
        try:
            return set(ft2font.FT2Font(path).get_charmap())
        except (OSError, RuntimeError):  # a file FreeType cannot read
            return set()

    # With fallback: a matplotlibrc may list only sans-serif fonts that are not installed.
    default = font_manager.findfont(font_manager.FontProperties(family=["sans-serif"]))
    families = [ft2font.FT2Font(default).family_name]
    wanted = {ord(c) for text in texts for c in text if unicodedata.category(c)[0] not in "CZ"}
    missing = wanted - characters(default)
    files: dict[str, list[str]] = {}
    for font in font_manager.fontManager.ttflist:
        files.setdefault(font.name, []).append(font.fname)
    for name, paths in files.items():
        # Last Resort has a placeholder glyph for every code point: a box by another name.
        if not missing or name in families or name.startswith("Last Resort"):
            continue
        # findfont scores every installed font: only for a family some file of which has a
        # missing character (the file it resolves to is one of them).
        if not any(missing & characters(path) for path in paths):
            continue
        try:
            found = missing & characters(drawn_with(name))
        except ValueError:  # not found after all
            continue
        if found:
            families.append(name)
            missing -= found
    return families, "".join(map(chr, sorted(missing)))


@contextmanager
def _quiet_font_lookups() -> Iterator[None]:
    """matplotlib logs each family without a regular weight as it looks at it ("findfont:
    Failed to find font weight normal for DejaVu Sans Condensed, now using 380") and takes the
    nearest weight, which is all a class name needs."""
    lookups = logging.getLogger("matplotlib.font_manager")
    level = lookups.level
    lookups.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lookups.setLevel(level)


def plot_confusion(path: Path, confusion: list[list[int]], classes: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _quiet_font_lookups():
        families, absent = fonts_for([*classes, title])
        if absent:
            log.warning(
                "%s: no installed font has the characters %s, drawn as boxes in the class "
                "names (a font for their script, e.g. Noto Sans CJK, would draw them)",
                path.name,
                " ".join(absent),
            )
        with (
            # Class names are text: '$' in a folder name started matplotlib's math mode, which
            # drew 'US$ vs CA$' in italics and raised on 'cost$_$' (the run never finished).
            matplotlib.rc_context({"font.family": families, "text.parse_math": False}),
            warnings.catch_warnings(),  # one warning above, not one per character
        ):
            # "missing from font(s) ..."; before matplotlib 3.9, "missing from current font."
            warnings.filterwarnings("ignore", "Glyph .* missing from", UserWarning)
            _draw_confusion(plt, path, confusion, classes, title)


def _draw_confusion(
    plt: Any, path: Path, confusion: list[list[int]], classes: list[str], title: str
) -> None:
    n = len(classes)
    # A cell is 0.6 inch; with few classes the title and the axis labels set the width.
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 + 0.6 * n), max(4.0, 0.6 + 0.6 * n)))
    peak = max(max(row) for row in confusion) or 1
    # The scale starts at 0, not at the smallest count: the text colour below assumes it.
    ax.imshow(confusion, cmap="Blues", vmin=0, vmax=peak)
    for i in range(n):
        for j in range(n):
            value = confusion[i][j]
            color = "white" if value > peak / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    # "tight" grows the saved canvas to whatever the labels need (long class names included),
    # where tight_layout could only shrink the axes within a fixed figure, and gave up.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
