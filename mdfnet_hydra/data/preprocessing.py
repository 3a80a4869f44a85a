"""What is fitted on the training split (clinical normaliser, test-size tokenizer), how it travels
inside checkpoints, and the datasets it produces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mdfnet_hydra.config import Modality, ModelConfig
from mdfnet_hydra.data.clinical import ClinicalNormalizer
from mdfnet_hydra.data.dataset import MultimodalDataset, SplitData


@dataclass
class Preprocessing:
    modalities: list[str]
    clinical: Optional[ClinicalNormalizer] = None
    tokenizer: Any = None
    tokenizer_json: Optional[str] = None

    @property
    def clinical_dim(self) -> int:
        return self.clinical.out_dim if self.clinical is not None else 0

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id) if self.tokenizer is not None else 0

    @classmethod
    def create(
        cls, model: ModelConfig, modalities: list[str], train: SplitData, state: Optional[dict] = None
    ) -> "Preprocessing":
        """Fit on `train`, or restore from a checkpoint's `preprocessing` state when given."""
        prep = cls(modalities=list(modalities))
        if Modality.clinical.value in modalities:
            saved = (state or {}).get("clinical")
            prep.clinical = ClinicalNormalizer.from_state_dict(saved) if saved else ClinicalNormalizer.fit(train.frame)
        if Modality.text.value in modalities:
            from mdfnet_hydra.models.text import build_tokenizer, serialise_tokenizer

            prep.tokenizer = build_tokenizer(
                model.text, train.frame["text"].tolist(), (state or {}).get("tokenizer_json")
            )
            prep.tokenizer_json = serialise_tokenizer(model.text, prep.tokenizer)
        return prep

    def state(self) -> dict:
        return {
            "clinical": self.clinical.state_dict() if self.clinical is not None else None,
            "tokenizer_json": self.tokenizer_json,
        }

    def dataset(
        self,
        split: SplitData,
        root: Path,
        model: ModelConfig,
        augment: bool = False,
        token_cache: Optional[Path] = None,
    ) -> MultimodalDataset:
        """Text is tokenised and clinical features transformed once here, not per item or epoch.
        `augment`: random training-image transforms (for the training split); `token_cache`: the
        directory where token ids are stored once and shared with other jobs (None: in memory)."""
        image_transform = token_ids = clinical = None
        if Modality.vision.value in self.modalities:
            from mdfnet_hydra.models.vision import build_image_transform

            image_transform = build_image_transform(model.vision, train=augment)
        if self.tokenizer is not None:
            from mdfnet_hydra.data.token_cache import token_ids as cached_token_ids

            token_ids = cached_token_ids(
                self.tokenizer, split.frame["text"].fillna("").tolist(), model.text.max_length, token_cache, split.name
            )
        if self.clinical is not None:
            clinical = self.clinical.transform(split.frame)
        return MultimodalDataset(split, root, image_transform=image_transform, token_ids=token_ids, clinical=clinical)

    def datasets(self, splits: dict[str, SplitData], root: Path, cfg) -> dict[str, MultimodalDataset]:
        """Every non-empty split as a training job opens it: `data.augment` for the training split
        only, token ids through the shared token cache unless `data.token_cache=false`."""
        from mdfnet_hydra.data.token_cache import cache_dir

        return {
            name: self.dataset(
                split, root, cfg.model, augment=bool(cfg.data.augment) and name == "train", token_cache=cache_dir(cfg)
            )
            for name, split in splits.items()
            if len(split)
        }
