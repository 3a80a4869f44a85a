"""Sections of a MIMIC-CXR free-text report, and the input text built from them.

The CheXpert labels of MIMIC-CXR were extracted from FINDINGS and IMPRESSION, so by default the text
is what was known before the read: INDICATION, HISTORY / CLINICAL HISTORY, REASON FOR EXAM(INATION),
plus the ED chief complaint.

The parser is an allow-list: text reaches a before-the-read section only when it clearly belongs to
one, i.e. it is the first paragraph after that section's header and before any other header. Any
other text (before the first header, after a blank line or a short finished line, after an unknown
header) is dropped, so a layout the parser does not know drops text rather than leaking the read.
After-the-read headers are found anywhere in a line, in any case, numbered (`FINDINGS 2:`) or
combined (`FINDINGS/IMPRESSION:`, which counts as findings); a before-the-read header opens its
section only when written as the report template writes it (see `_header_in`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

HEADERS = {
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "HISTORY": "history",
    "CLINICAL HISTORY": "history",
    "CLINICAL INFORMATION": "history",
    "REASON FOR EXAM": "reason_for_exam",
    "REASON FOR EXAMINATION": "reason_for_exam",
    "EXAMINATION": "examination",
    "TECHNIQUE": "technique",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "FINDINGS": "findings",
    "IMPRESSION": "impression",
    "CONCLUSION": "impression",
    "NOTIFICATION": "notification",
    "WET READ": "wet_read",
    "ADDENDUM": "addendum",
}
# What was known before the radiologist read the image: the only sections that may be input text
# without text.allow_label_source. Everything else (findings, impression and the notification, wet
# read and addendum that repeat them) carries the read the labels were extracted from.
BEFORE_READ_SECTIONS = ("indication", "history", "reason_for_exam", "examination", "technique", "comparison")
KNOWN_SECTIONS = tuple(sorted(set(HEADERS.values())))
LABEL_SOURCE_SECTIONS = tuple(s for s in KNOWN_SECTIONS if s not in BEFORE_READ_SECTIONS)
WRAP_WIDTH = 60  # a line shorter than this that ends a sentence was ended by hand, not wrapped

_COLON = re.compile(r":(?!\d)")  # not the colon of a time (10:30)
_SEGMENT_END = re.compile(r"[.;?!,:]|//|\s{2,}")  # what may precede a header on its line
_NUMBERING = re.compile(r"\s*(?:#?\d+|\(\d+\))$")  # FINDINGS 2, FINDINGS #2, FINDINGS (2)
_JOINERS = re.compile(r"\s*(?:/|&|\+|\bAND\b)\s*")  # FINDINGS/IMPRESSION, FINDINGS AND IMPRESSION
_LOOKS_LIKE_HEADER = re.compile(r"^[A-Z][A-Z0-9 /&()#\-]*$")
_MAX_HEADER_WORDS = 5


def parse_sections(report: str) -> dict[str, str]:
    """Canonical section name -> text (whitespace collapsed); repeated sections are joined. Text
    under an unknown header, or outside any section, is dropped."""
    sections: dict[str, str] = {}
    for name, body in _bodies(report):
        if name and body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def _bodies(report: str) -> Iterator[tuple[Optional[str], str]]:
    headers = list(_headers(report))
    for i, (_, end, name) in enumerate(headers):
        stop = headers[i + 1][0] if i + 1 < len(headers) else len(report)
        body = report[end:stop]
        if name in BEFORE_READ_SECTIONS:
            body = _first_paragraph(body, column=end - (report.rfind("\n", 0, end) + 1))
        yield name, " ".join(body.split())


def _headers(report: str) -> Iterator[tuple[int, int, Optional[str]]]:
    """(start, end, canonical name or None for an unknown header) of every header, in order."""
    for colon in _COLON.finditer(report):
        line_start = report.rfind("\n", 0, colon.start()) + 1
        segment = _SEGMENT_END.split(report[line_start : colon.start()])[-1]
        found = _header_in(segment, at_line_start=not report[line_start : colon.start() - len(segment)].strip())
        if found:
            yield colon.start() - len(segment) + found[0], colon.end(), found[1]


def _header_in(segment: str, at_line_start: bool) -> Optional[tuple[int, Optional[str]]]:
    """(offset, name) of the header that ends `segment` (the text before a colon), if any.

    Easy to stop, hard to start: an after-the-read header counts in any case and after any words
    ("... no change FINDINGS:"); a before-the-read one only in capitals with nothing before it on
    its line but punctuation, so "given history: CHF" inside the findings never opens a section
    that becomes input text. Other short phrases in capitals that start their line are unknown
    headers (their text dropped); "History:", "PMH:" or "Question:" inside an indication are its text.
    """
    words = list(re.finditer(r"\S+", segment))
    for k in range(min(len(words), _MAX_HEADER_WORDS), 0, -1):
        start = words[-k].start()
        name = section_of(segment[start:])
        if name is None:
            continue
        if name not in BEFORE_READ_SECTIONS:
            return start, name
        if k == len(words) and segment[start:].isupper():
            return start, name
    text = segment.strip()
    if (
        words
        and len(words) <= _MAX_HEADER_WORDS
        and at_line_start
        and text.isupper()
        and _LOOKS_LIKE_HEADER.match(text)
    ):
        return words[0].start(), None
    return None


def section_of(header: str) -> Optional[str]:
    """Canonical section of a header's text, or None if any part of it is unknown. Of a combined
    header, the first after-the-read part wins, so `INDICATION/FINDINGS:` is findings."""
    parts = [_NUMBERING.sub("", p).strip() for p in _JOINERS.split(header.strip().upper())]
    names = [HEADERS.get(p) for p in parts if p]
    if not names or None in names:
        return None
    after_read = [n for n in names if n not in BEFORE_READ_SECTIONS]
    return after_read[0] if after_read else names[0]


def _first_paragraph(body: str, column: int) -> str:
    """The body's first paragraph: it ends at a blank line, or after any line that ends before the
    wrap width (a line continues on the next only when it was wrapped, so findings written on the
    line after a short indication never join it). `column` is where the body starts on the
    header's line."""
    kept: list[str] = []
    for i, line in enumerate(body.split("\n")):
        if not line.strip():
            if kept:
                break
            continue
        kept.append(line)
        width = len(line.rstrip()) + (column if i == 0 else 0)
        if width < WRAP_WIDTH:
            break
    return "\n".join(kept)


def read_report(path: Path) -> Optional[str]:
    return path.read_text(errors="replace") if path.is_file() else None


def input_text(sections: dict[str, str], wanted: Sequence[str], chief_complaint: Optional[str]) -> str:
    parts = [f"{name.replace('_', ' ').upper()}: {sections[name]}" for name in wanted if sections.get(name)]
    if chief_complaint:
        parts.append(f"CHIEF COMPLAINT: {' '.join(str(chief_complaint).split())}")
    return " ".join(parts)
