"""Report blocks (headings, paragraphs, tables, figures) and their renderings as console text,
markdown, self-contained HTML and LaTeX, so every format shows the same numbers and marks."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

from tabulate import tabulate

from bench.run_folder import plot_path


@dataclass
class Cell:
    """One table cell: its text and whether it is marked (best per column, or CI excluding 0)."""

    text: str
    bold: bool = False


@dataclass
class Table:
    """A titled table; `notes` are sentences printed under it; `wrap`: its cells may wrap (HTML), for
    tables of sentences or lists rather than numbers."""

    title: str
    headers: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    wrap: bool = False

    def to_text(self, tablefmt: str = "simple") -> str:
        """Plain text (console); marked cells get a trailing ` *`."""
        body = [[c.text + (" *" if c.bold else "") for c in r] for r in self.rows]
        return tabulate(body, headers=self.headers, tablefmt=tablefmt, disable_numparse=True)

    def to_markdown(self) -> str:
        """GitHub markdown; marked cells are **bold**."""
        body = [[f"**{c.text}**" if c.bold else c.text for c in r] for r in self.rows]
        return tabulate(body, headers=self.headers, tablefmt="github", disable_numparse=True)

    def to_html(self) -> str:
        """An HTML <table>; marked cells are <b>bold</b>."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        rows = []
        for r in self.rows:
            tds = "".join(
                f"<td>{'<b>' if c.bold else ''}{_ci_html(c.text)}{'</b>' if c.bold else ''}</td>" for c in r
            )
            rows.append(f"<tr>{tds}</tr>")
        return (
            f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
        )

    def to_latex(self) -> str:
        """A booktabs tabular (scaled to the text width); marked cells are \\textbf."""
        cols = "l" + "r" * (len(self.headers) - 1)
        lines = [
            r"\begin{table}[ht]",
            r"\centering",
            f"\\caption{{{latex_escape(self.title)}}}",
            r"\resizebox{\textwidth}{!}{%",
            f"\\begin{{tabular}}{{{cols}}}",
            r"\toprule",
            " & ".join(latex_escape(h) for h in self.headers) + r" \\",
            r"\midrule",
        ]
        for r in self.rows:
            lines.append(
                " & ".join(
                    f"\\textbf{{{latex_escape(c.text)}}}" if c.bold else latex_escape(c.text) for c in r
                )
                + r" \\"
            )
        lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
        return "\n".join(lines)


_CI = re.compile(r"^(\S+) (\[[^\]]+\])$")


def _ci_html(text: str) -> str:
    """`0.712 [0.701, 0.723]` as the value over its interval in smaller type (narrow columns, so a
    table of intervals fits the window); other text escaped as is."""
    m = _CI.match(text)
    if not m:
        return html.escape(text)
    return f"{html.escape(m.group(1))}<br><span class=ci>{html.escape(m.group(2))}</span>"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and turn the direction arrows into math arrows)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    """A paragraph; `code` and **bold** spans are rendered in every format."""

    text: str
    note: bool = False


@dataclass
class Code:
    text: str


@dataclass
class Figure:
    """A figure, saved by the run folder as `plot_path(name)` and linked (or embedded) from there."""

    name: str
    caption: str
    png: bytes


Block = Heading | Para | Code | Table | Figure


def _inline_md_to_html(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _inline_md_to_latex(text: str) -> str:
    parts = re.split(r"(`[^`]+`|\*\*[^*]+\*\*)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) > 1:
            out.append(r"\texttt{" + latex_escape(p[1:-1]) + "}")
        elif p.startswith("**") and p.endswith("**") and len(p) > 3:
            out.append(r"\textbf{" + latex_escape(p[2:-2]) + "}")
        else:
            out.append(latex_escape(p))
    return "".join(out)


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(f"_{b.text}_" if b.note and "_" not in b.text else b.text)
        elif isinstance(b, Code):
            out.append(f"```\n{b.text}\n```")
        elif isinstance(b, Table):
            if b.headers == ["", ""]:  # key/value facts
                out.append("\n".join(f"- **{r[0].text}**: {r[1].text}" for r in b.rows))
            else:
                out.append(f"**{b.title}**\n\n{b.to_markdown()}" + "".join(f"\n\n_{n}_" for n in b.notes))
        elif isinstance(b, Figure):
            out.append(f"![{b.caption}]({plot_path(b.name)})\n\n_{b.caption}_")
    return "\n\n".join(out) + "\n"


CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:1.5em auto;"
    "padding:0 1em;color:#222}\n"
    "table.wrapcells td{white-space:normal;text-align:left;max-width:420px}.ci{color:#666;font-size:11px}\n"
    "table{border-collapse:collapse;margin:.4em 0 1.2em;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}\n"
    "th{background:#f0f0f0;white-space:normal}\n"
    "td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:600;padding:4px 0}\n"
    "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}.note{color:#555;font-size:13px}.wrap{overflow-x:auto}\n"
    "figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}"
    "figcaption{color:#555;font-size:13px}\n"
    "dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}"
    "dl.facts dt{font-weight:600}dl.facts dd{margin:0}"
)


def to_html(blocks: list[Block]) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "bench report")
    out = [
        "<!doctype html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p{' class=note' if b.note else ''}>{_inline_md_to_html(b.text)}</p>")
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Table):
            if b.headers == ["", ""]:
                out.append(
                    "<dl class=facts>"
                    + "".join(
                        f"<dt>{html.escape(r[0].text)}</dt><dd>{html.escape(r[1].text)}</dd>" for r in b.rows
                    )
                    + "</dl>"
                )
            else:
                cls = " class=wrapcells" if b.wrap else ""
                caption = f"<table{cls}><caption>{html.escape(b.title)}</caption>"
                tab = b.to_html().replace("<table>", caption, 1)
                out.append(
                    f"<div class=wrap>{tab}</div>"
                    + "".join(f"<p class=note>{_inline_md_to_html(n)}</p>" for n in b.notes)
                )
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(
                f"<figure><img alt='{html.escape(b.caption, quote=True)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def to_latex(blocks: list[Block]) -> str:
    out = [
        r"\documentclass[10pt]{article}",
        r"\usepackage[margin=2cm]{geometry}",
        r"\usepackage{booktabs,graphicx}",
        r"\usepackage[T1]{fontenc}",
        r"\usepackage[utf8]{inputenc}",
        r"\DeclareUnicodeCharacter{2212}{-}",
        r"\DeclareUnicodeCharacter{2013}{--}",
        r"\begin{document}",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            cmd = {1: "section*", 2: "subsection*", 3: "subsubsection*"}.get(b.level, "paragraph")
            out.append(f"\\{cmd}{{{latex_escape(b.text)}}}")
        elif isinstance(b, Para):
            out.append(_inline_md_to_latex(b.text) + "\n")
        elif isinstance(b, Code):
            out.append(r"\begin{verbatim}" + "\n" + b.text + "\n" + r"\end{verbatim}")
        elif isinstance(b, Table):
            if b.headers == ["", ""]:
                out.append(
                    r"\begin{description}"
                    + "".join(
                        f"\n\\item[{latex_escape(r[0].text)}] {latex_escape(r[1].text)}" for r in b.rows
                    )
                    + "\n"
                    + r"\end{description}"
                )
            else:
                out.append(b.to_latex() + "".join(f"\n{_inline_md_to_latex(n)}\n" for n in b.notes))
        elif isinstance(b, Figure):
            out.append(
                r"\begin{figure}[ht]\centering"
                + f"\n\\includegraphics[width=\\linewidth]{{{plot_path(b.name)}}}\n"
                f"\\caption{{{_inline_md_to_latex(b.caption)}}}\n" + r"\end{figure}"
            )
    out.append(r"\end{document}")
    return "\n".join(out) + "\n"


def to_text(blocks: list[Block]) -> str:
    """Console text: each table (title, then plain text) and each paragraph that is not a note;
    headings, notes, code and figures are left out."""
    out = []
    for b in blocks:
        if isinstance(b, Table):
            out.append(f"{b.title}\n{b.to_text()}")
        elif isinstance(b, Para) and not b.note:
            out.append(b.text)
    return "\n\n".join(out) + "\n" if out else ""
