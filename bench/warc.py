"""The HTML pages of a Common Crawl WARC file as plain text, for the quality benchmarks.

    for url, text in warc_pages(path): ...

Only what the benchmarks need, on the standard library: every `response` record whose HTTP payload is
text/html, its text extracted with html.parser: script, style and the like left out, a newline after
every block element, whitespace runs inside a block made one space. The result is laid out as web text
usually reaches a pipeline: one line per block, single newlines, navigation and footers included.
"""

from __future__ import annotations

import gzip
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

SKIP = {"script", "style", "noscript", "svg", "template", "head", "iframe"}
BLOCKS = {"p", "div", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "br", "tr", "td", "th", "table",
          "section", "article", "header", "footer", "nav", "aside", "main", "blockquote", "pre", "dt", "dd",
          "figcaption", "form", "hr", "title"}


class _Text(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in SKIP:
            self.skipping += 1
        elif tag in BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).split("\n"))
        return "\n".join(line for line in lines if line)


def html_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    parser.close()
    return parser.text()


def warc_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(url, text) for every HTML response in a .warc.gz file."""
    data = gzip.decompress(path.read_bytes())
    for record in re.split(rb"(?=WARC/1\.0\r?\n)", data):
        head, _, block = record.partition(b"\r\n\r\n")
        if b"WARC-Type: response" not in head:
            continue
        url = re.search(rb"WARC-Target-URI: <?([^>\r\n]+)", head)
        http_head, _, payload = block.partition(b"\r\n\r\n")
        if b"text/html" not in http_head.lower():
            continue
        charset = re.search(rb"charset=([\w-]+)", http_head, re.IGNORECASE)
        text = payload.decode(charset.group(1).decode() if charset else "utf-8", errors="replace")
        yield (url.group(1).decode() if url else ""), html_text(text)
