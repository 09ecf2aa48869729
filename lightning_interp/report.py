"""One HTML report for the demo and the audit: a section per method, each saying how to read its numbers.

A :class:`Section` holds a method's scalars (each with its standard error where it is an estimate), its
figures (PNG files next to the report) and tables; :func:`callback_section` builds one from a callback's last
measurement, :func:`write_html` writes ``report.html``. The page records in ``data-images-loaded`` /
``data-images-total`` attributes of ``<body>`` how many images the browser could load, and each section's
``data-items`` how many numbers, figures and tables it shows (a test renders it in headless Chromium). A
section's introduction is its method's ``intro`` in :data:`lightning_interp.methods.METHODS` (:func:`intro`).

Example:
    >>> import tempfile, os
    >>> s = Section("posterior", "Posterior gap", "Two sentences.", scalars=[("kl", 0.1, 0.01)])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = write_html(d, "report", [s])
    ...     "0.1 ± 0.01" in open(path).read()
    True
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Section", "callback_section", "intro", "intros", "latest_figures", "scalars_with_se", "write_html"]


def intro(callback: Any) -> str:
    """The introduction of a callback's method (an instance, a class or a name the registry knows); ``""`` if none.

    The text is the :class:`~lightning_interp.methods.Method` record's ``intro``, so a method added to
    :data:`~lightning_interp.methods.METHODS` gets its introduction in every report.
    """
    from lightning_interp import methods

    if isinstance(callback, str):
        try:
            return methods.find(callback).intro
        except ValueError:
            return ""
    record = methods.for_callback(callback)
    return record.intro if record is not None else ""


def intros() -> dict[str, str]:
    """Every method's introduction by key (of :data:`~lightning_interp.methods.METHODS`, read now)."""
    from lightning_interp import methods

    return {m.key: m.intro for m in methods.METHODS}


@dataclass
class Section:
    """One method's part of the report.

    Attributes:
        key: the top-level key of this method in ``report.json``.
        title: the heading.
        intro: two sentences on what the numbers mean and how to read the figures.
        scalars: ``(name, value, standard error or None)``.
        figures: ``(path relative to the report, caption)``.
        tables: ``(caption, columns, rows)``.
        notes: further sentences (choices made, what was skipped and why).
    """

    key: str
    title: str
    intro: str
    scalars: list[tuple[str, float, float | None]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The section's numbers for ``report.json``: ``{"scalars": {name: value, name_se: se}, ...}``."""
        scalars: dict[str, float | None] = {}
        for name, value, se in self.scalars:
            scalars[name] = _json_float(value)
            if se is not None:
                scalars[f"{name}_se"] = _json_float(se)
        return {
            "title": self.title,
            "scalars": scalars,
            "figures": [path for path, _ in self.figures],
            "tables": {caption: [dict(zip(columns, row, strict=True)) for row in rows] for caption, columns, rows in self.tables},
            "notes": list(self.notes),
        }


def _json_float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def scalars_with_se(entry: dict[str, float], skip: Sequence[str] = ("step", "epoch")) -> list[tuple[str, float, float | None]]:
    """Pair every scalar ``x`` of a history entry with ``x_se`` when there is one."""
    out = []
    for name, value in entry.items():
        if name in skip or name.endswith("_se"):
            continue
        out.append((name, float(value), float(entry[f"{name}_se"]) if f"{name}_se" in entry else None))
    return out


def latest_figures(folder: str | os.PathLike) -> list[str]:
    """The newest PNG per figure key in ``folder`` (files are named ``<key>_stepNNNNNN.png``), sorted by key."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    latest: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png") and "_step" in name:
            latest[name.rsplit("_step", 1)[0]] = name
    return [os.path.join(folder, latest[k]) for k in sorted(latest)]


def callback_section(callback: Any, out: str | os.PathLike, key: str | None = None, title: str | None = None) -> Section:
    """A section from a callback's last measurement and the figures it wrote into its ``figure_dir``."""
    name = type(callback).__name__
    scalars = scalars_with_se(callback.history[-1]) if callback.history else []
    figures = []
    if callback.figure_dir:
        for path in latest_figures(callback.figure_dir):
            caption = os.path.basename(path).rsplit("_step", 1)[0].replace("_", " ")
            figures.append((os.path.relpath(path, out), caption))
    notes = [] if callback.history else [f"{name} did not measure."]
    notes += [f"Warning: {message}" for message in getattr(callback, "warning_log", [])]
    tables: list[tuple[str, list[str], list[list[Any]]]] = []
    if getattr(callback, "last", None) is not None:
        for table, (columns, rows) in callback.tables(callback.last).items():
            tables.append((table.replace("_", " "), list(columns), [list(r) for r in rows]))
    heading = title or f"{name} ({callback.prefix}/...)"
    return Section(key or callback.prefix, heading, intro(callback), scalars, figures, tables, notes)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _section_html(s: Section) -> str:
    parts = [f"<h2>{html.escape(s.title)}</h2>", f'<p class="intro">{html.escape(s.intro)}</p>']
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
    if s.scalars:
        lines = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{_fmt(v)}{'' if se is None else ' ± ' + _fmt(se)}</td></tr>"
            for n, v, se in s.scalars
        )
        parts.append(f"<table><tr><th>measure</th><th>value ± standard error</th></tr>{lines}</table>")
    for path, caption in s.figures:
        src = html.escape(path.replace(os.sep, "/"))
        parts.append(
            f'<figure><img src="{src}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        )
    for caption, columns, rows in s.tables:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
        parts.append(f"<h3>{html.escape(caption)}</h3><table><tr>{head}</tr>{body}</table>")
    items = len(s.scalars) + len(s.figures) + sum(len(rows) for _, _, rows in s.tables)
    return f'<section id="{html.escape(s.key)}" data-items="{items}">{"".join(parts)}</section>'


def _lead_html(warnings: Sequence[str], preprocessing: str | None) -> str:
    """The top of the page: the warnings that the numbers may mean nothing, then the preprocessing used."""
    parts = [f'<p class="warning"><strong>Warning:</strong> {html.escape(w)}</p>' for w in warnings]
    if preprocessing:
        parts.append(f'<p class="preprocessing"><strong>Preprocessing:</strong> {html.escape(preprocessing)}</p>')
    return f'<div id="warnings" data-warnings="{len(warnings)}">{"".join(parts)}</div>' if parts else ""


def write_html(
    out: str | os.PathLike,
    title: str,
    sections: Sequence[Section],
    meta: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
    preprocessing: str | None = None,
) -> str:
    """Write ``out/report.html`` with one ``<section>`` per :class:`Section`; returns its path.

    Args:
        out: the folder.
        title: the page's title and heading.
        sections: the methods' sections, in order.
        meta: a table of facts under the heading.
        warnings: sentences shown first, above everything else (numbers that may mean nothing).
        preprocessing: how the images became model inputs, stated at the top.
    """
    meta_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in (meta or {}).items())
    meta_html = _lead_html(warnings, preprocessing) + (f"<table>{meta_rows}</table>" if meta_rows else "")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} img{{max-width:100%;border:1px solid #ccc}}
figure{{margin:1em 0}} table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}
section{{border-top:2px solid #888;margin-top:2em}} .intro{{color:#333}} .note{{color:#844}}
.warning{{background:#fde8e8;border:2px solid #c00;padding:0.5em;color:#600}}</style></head>
<body data-images-loaded="pending">
<h1>{html.escape(title)}</h1>{meta_html}
{"".join(_section_html(s) for s in sections)}
<script>
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""
    path = os.path.join(os.fspath(out), "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path
