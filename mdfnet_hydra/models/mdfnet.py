"""Enhanced MDF-Net: encoders -> per-modality adapters -> fusion -> two-layer head -> 14 logits."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from mdfnet_hydra.config import FusionConfig, FusionKind, HeadConfig, Modality, ModelConfig, TokenOutput
from mdfnet_hydra.labels import NUM_LABELS

PRETRAINED_ENCODERS = (Modality.vision.value, Modality.text.value)


class AttentionPool(nn.Module):
    """A learned query attends over a modality's tokens: trainable pooling even when the encoder
    is frozen, so stage 1 can still pick out the image regions or words that matter."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        query = self.query.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attn(query, tokens, tokens, key_padding_mask=padding, need_weights=False)
        return self.norm(pooled.squeeze(1))


class ModalityAdapter(nn.Module):
    """Projects one modality's output to the fusion width; pools token sequences to one vector."""

    def __init__(self, in_dim: int, dim: int, heads: int, pool: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPool(dim, heads) if pool else None

    def forward(self, tokens: torch.Tensor, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.norm(self.proj(tokens))
        return self.pool(x, padding) if self.pool is not None else x[:, 0]


class Fusion(nn.Module):
    """Fuses one vector per modality. `attention`: a transformer layer over the modality tokens
    (with learned modality-type embeddings), mean-pooled; `concat`: concatenation + MLP."""

    def __init__(self, num_modalities: int, cfg: FusionConfig) -> None:
        super().__init__()
        self.kind = FusionKind(cfg.kind)
        if self.kind is FusionKind.attention:
            self.type_embed = nn.Parameter(torch.zeros(num_modalities, cfg.dim))
            layer = nn.TransformerEncoderLayer(
                cfg.dim, cfg.heads, dim_feedforward=2 * cfg.dim, dropout=cfg.dropout, batch_first=True, norm_first=True
            )
            self.mixer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        else:
            self.mixer = nn.Sequential(nn.Linear(num_modalities * cfg.dim, cfg.dim), nn.GELU())
        self.norm = nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.kind is FusionKind.attention:
            fused = self.mixer(vectors + self.type_embed).mean(dim=1)
        else:
            fused = self.mixer(vectors.flatten(1))
        return self.dropout(self.norm(fused))


class ClassificationHead(nn.Sequential):
    """Dropout -> Linear -> GELU -> Dropout -> Linear: the spec's two head layers (dropout 0.3 / 0.2)."""

    def __init__(self, in_dim: int, cfg: HeadConfig, num_labels: int = NUM_LABELS) -> None:
        super().__init__(
            nn.Dropout(cfg.dropout1),
            nn.Linear(in_dim, cfg.hidden_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout2),
            nn.Linear(cfg.hidden_dim, num_labels),
        )


class MDFNet(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: FusionConfig, head: HeadConfig) -> None:
        super().__init__()
        self.modalities = [
            m for m in (Modality.vision.value, Modality.text.value, Modality.clinical.value) if m in encoders
        ]
        if not self.modalities:
            raise ValueError("MDFNet needs at least one modality")
        # Pre-trained encoders (frozen in stage 1) apart from the clinical encoder, which starts
        # from scratch and therefore always trains with the fusion layer.
        self.encoders = nn.ModuleDict({m: encoders[m] for m in PRETRAINED_ENCODERS if m in encoders})
        self.clinical_encoder = encoders.get(Modality.clinical.value)
        self.adapters = nn.ModuleDict(
            {
                m: ModalityAdapter(encoders[m].out_dim, fusion.dim, fusion.heads, pool=_emits_tokens(encoders[m]))
                for m in self.modalities
            }
        )
        self.fusion = Fusion(len(self.modalities), fusion)
        self.head = ClassificationHead(fusion.dim, head)
        self.encoders_frozen = False

    def set_encoders_frozen(self, frozen: bool) -> None:
        self.encoders_frozen = frozen
        for p in self.encoders.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "MDFNet":
        super().train(mode)
        if self.encoders_frozen:
            self.encoders.eval()  # frozen encoders give deterministic outputs (no dropout)
        return self

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each pre-trained encoder's output (tokens, padding mask); no autograd when frozen.
        A batch from the feature cache carries these outputs (`<modality>_features`) already."""
        out: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        for m in self.encoders:
            if f"{m}_features" in batch:
                if not self.encoders_frozen:
                    raise RuntimeError(f"cached {m} features need frozen encoders (the cache is for stage 1 only)")
                out[m] = (batch[f"{m}_features"].float(), batch.get(f"{m}_padding"))
        with torch.no_grad() if self.encoders_frozen else nullcontext():
            if "vision" in self.encoders and "vision" not in out:
                out["vision"] = (self.encoders["vision"](batch["image"]), None)
            if "text" in self.encoders and "text" not in out:
                out["text"] = self.encoders["text"](batch["input_ids"], batch["attention_mask"])
        return out

    def fuse(
        self, encoded: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]], batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        vectors = []
        for m in self.modalities:
            if m == Modality.clinical.value:
                tokens, padding = self.clinical_encoder(batch["clinical"]), None
            else:
                tokens, padding = encoded[m]
            vectors.append(self.adapters[m](tokens, padding))
        return self.head(self.fusion(torch.stack(vectors, dim=1)))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fuse(self.encode(batch), batch)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """encoders / fusion (clinical encoder, adapters, fusion) / head, for discriminative LRs."""
        fusion = list(self.adapters.parameters()) + list(self.fusion.parameters())
        if self.clinical_encoder is not None:
            fusion = list(self.clinical_encoder.parameters()) + fusion
        return {"encoders": list(self.encoders.parameters()), "fusion": fusion, "head": list(self.head.parameters())}


def _emits_tokens(encoder: nn.Module) -> bool:
    return getattr(encoder, "output", None) is TokenOutput.tokens


def build_model(cfg: ModelConfig, modalities: list[str], clinical_dim: int = 0, tokenizer=None) -> MDFNet:
    """Build only the encoders that `modalities` names."""
    encoders: dict[str, nn.Module] = {}
    if Modality.vision.value in modalities:
        from mdfnet_hydra.models.vision import build_vision_encoder

        encoders["vision"] = build_vision_encoder(cfg.vision)
    if Modality.text.value in modalities:
        from mdfnet_hydra.models.text import build_text_encoder

        encoders["text"] = build_text_encoder(cfg.text, tokenizer)
    if Modality.clinical.value in modalities:
        from mdfnet_hydra.models.clinical import ClinicalEncoder

        encoders["clinical"] = ClinicalEncoder(clinical_dim, cfg.clinical.hidden_dims, cfg.clinical.dropout)
    return MDFNet(encoders, cfg.fusion, cfg.head)
