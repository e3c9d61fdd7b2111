"""Rendering a report, given as a list of blocks, to Markdown and to self-contained HTML; tables
as JSON rows (the commands' --json).

A block is ("h1"|"h2"|"p", text), ("table", DataFrame), ("img", path relative to the report,
caption) or ("list", items). `code` spans in text become <code> in HTML.
"""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

Block = tuple


def json_rows(table: pd.DataFrame) -> list[dict]:
    """A table as rows for json.dumps: numpy scalars as Python numbers, NaN and infinities as null
    (strict JSON has neither), so any JSON reader parses them."""
    def plain(value):
        value = value.item() if isinstance(value, np.generic) else value
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return [{str(k): plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def _md_table(df: pd.DataFrame) -> str:
    cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            out.append(_md_table(rest[0]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})\n\n*{rest[1]}*")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in rest[0]))
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f0f0f0}
img{max-width:100%}figure{margin:1.5em 0}
figcaption{font-size:0.9em;color:#555}code{background:#f4f4f4;padding:0 3px}"""


def render_html(blocks: list[Block], root: Path) -> str:
    """Self-contained HTML: figures (paths relative to root) inlined as base64 PNG data URIs."""
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "table":
            body.append(rest[0].to_html(index=False, border=0))
        elif kind == "img":
            data = base64.b64encode((root / rest[0]).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">'
                        f"<figcaption>{html.escape(rest[1])}</figcaption></figure>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in rest[0]) + "</ul>")
    title = html.escape(blocks[0][1])
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
