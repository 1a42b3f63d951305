"""CITATION.cff is valid CFF 1.2.0 in its required keys (GitHub's "Cite this repository" reads it), and names the
license that LICENSE holds."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("cff-version", "message", "title", "authors")
REFERENCE_REQUIRED = ("type", "title", "authors")


def person_problems(where: str, authors) -> list[str]:
    if not isinstance(authors, list) or not authors:
        return [f"{where}: authors must be a non-empty list"]
    return [f"{where}: author {i} has neither family-names nor name" for i, a in enumerate(authors)
            if not isinstance(a, dict) or not (a.get("family-names") or a.get("name"))]


def citation_problems(text: str) -> list[str]:
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        return ["not a YAML mapping"]
    problems = [f"missing key {key!r}" for key in REQUIRED if key not in data]
    if data.get("cff-version") != "1.2.0":
        problems.append(f"cff-version is {data.get('cff-version')!r}, expected '1.2.0'")
    if data.get("type", "software") not in ("software", "dataset"):
        problems.append(f"type {data['type']!r} is neither software nor dataset")
    problems += person_problems("authors", data.get("authors"))
    for i, reference in enumerate(data.get("references", [])):
        problems += [f"references[{i}]: missing key {key!r}" for key in REFERENCE_REQUIRED if key not in reference]
        problems += person_problems(f"references[{i}]", reference.get("authors"))
    return problems


def test_citation_file_has_the_required_keys():
    assert citation_problems((ROOT / "CITATION.cff").read_text()) == []


def test_citation_check_catches_a_broken_file():
    good = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    no_title = {k: v for k, v in good.items() if k != "title"}
    assert citation_problems(yaml.safe_dump(no_title)) == ["missing key 'title'"]
    old_version = {**good, "cff-version": "1.1.0"}
    assert citation_problems(yaml.safe_dump(old_version)) == ["cff-version is '1.1.0', expected '1.2.0'"]
    nameless = {**good, "authors": [{"email": "x@example.org"}]}
    assert citation_problems(yaml.safe_dump(nameless)) == ["authors: author 0 has neither family-names nor name"]


def test_citation_names_the_license_in_license_file():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["license"] == "MIT"
