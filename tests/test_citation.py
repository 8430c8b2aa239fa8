"""CITATION.cff: what GitHub's "Cite this repository" reads (CFF 1.2.0), citing the dataset's paper too."""

from __future__ import annotations

import re
from pathlib import Path

CITATION = Path(__file__).resolve().parents[1] / "CITATION.cff"


def test_citation_file_has_the_keys_cff_requires_and_cites_the_dataset_paper() -> None:
    text = CITATION.read_text(encoding="utf-8")
    # Top-level keys start a line; the schema requires these four (pyyaml is no dependency here).
    top_level = dict(re.findall(r"^([a-z][a-z-]*):[ ]*(.*)$", text, flags=re.MULTILINE))
    assert {"cff-version", "message", "title", "authors"} <= top_level.keys()
    assert top_level["cff-version"] == "1.2.0" and top_level["type"] == "software"
    assert "\t" not in text  # YAML forbids tabs for indentation
    references = text.split("\nreferences:\n", 1)[1]
    for field in ("title: Cats and Dogs", "family-names: Parkhi", "year: 2012", "doi: 10.1109/CVPR.2012.6248092"):
        assert field in references
