"""Sections of a MIMIC-CXR free-text report, and the input text built from them.

The CheXpert labels of MIMIC-CXR were extracted from FINDINGS and IMPRESSION, so by default the text
is what was known before the read: INDICATION, HISTORY / CLINICAL HISTORY, REASON FOR EXAM(INATION),
plus the ED chief complaint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

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
LABEL_SOURCE_SECTIONS = ("findings", "impression")
KNOWN_SECTIONS = tuple(sorted(set(HEADERS.values())))
_HEADER = re.compile(r"^\s*([A-Z][A-Z ]+?)\s*:", re.MULTILINE)


def parse_sections(report: str) -> dict[str, str]:
    """Canonical section name -> text (whitespace collapsed). Unknown headers end the section
    before them and are dropped; repeated sections are joined."""
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(report))
    for i, match in enumerate(matches):
        name = HEADERS.get(match.group(1).strip())
        end = matches[i + 1].start() if i + 1 < len(matches) else len(report)
        body = " ".join(report[match.end():end].split())
        if name and body:
            sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
    return sections


def read_report(path: Path) -> Optional[str]:
    return path.read_text(errors="replace") if path.is_file() else None


def input_text(sections: dict[str, str], wanted: Sequence[str], chief_complaint: Optional[str]) -> str:
    parts = [f"{name.replace('_', ' ').upper()}: {sections[name]}" for name in wanted if sections.get(name)]
    if chief_complaint:
        parts.append(f"CHIEF COMPLAINT: {' '.join(str(chief_complaint).split())}")
    return " ".join(parts)
