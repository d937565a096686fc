"""Which domain a model folder or reward belongs to (the embedded model's folder names ShapeWorld; a random pipeline none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpok.domains import DOMAIN_FILE, domain_for, folder_domain, model_domain, reward_domain, write_domain_file
from dpok.shapeworld.domain import DOMAIN as SHAPEWORLD


def test_the_embedded_model_names_its_domain_and_others_have_none(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    assert model_domain("shapeworld") is SHAPEWORLD
    assert model_domain(str(tiny_pipeline_dir)) is None and model_domain("org/hub-model") is None
    assert reward_domain("shapeworld-alignment+0.1*jpeg-compressibility") is SHAPEWORLD
    assert reward_domain("jpeg-compressibility") is None
    assert domain_for(str(tiny_pipeline_dir), "jpeg-compressibility") is None
    assert domain_for(str(tiny_pipeline_dir), "shapeworld-alignment") is SHAPEWORLD
    folder = tmp_path / "marked"
    folder.mkdir()
    write_domain_file(folder, "dpok.shapeworld.domain")
    assert folder_domain(folder) is SHAPEWORLD
    (folder / DOMAIN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not a domain file"):
        folder_domain(folder)
    (folder / DOMAIN_FILE).write_text(json.dumps({"module": "json"}))
    with pytest.raises(ValueError, match="must define DOMAIN"):
        folder_domain(folder)

