"""Clinical text encoder: any transformers encoder (ModernBERT, BERT, RoBERTa) via AutoModel, or a
test-size model built from a config with a WordPiece tokenizer trained on the training text."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from mdfnet_hydra.config import ConfigError, TextAttention, TextConfig, TextPooling, TextSource, TokenOutput, to_plain

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) -> (tokens (B, L, H), padding mask (B, L), True = padding)."""

    def __init__(self, backbone: nn.Module, output: TokenOutput, pooling: TextPooling = TextPooling.cls) -> None:
        super().__init__()
        self.backbone = backbone
        self.output = TokenOutput(output)
        self.pooling = TextPooling(pooling)
        self.out_dim = backbone.config.hidden_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.output is TokenOutput.tokens:
            return hidden, attention_mask == 0
        if self.pooling is TextPooling.mean:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            pooled = hidden[:, 0]
        return pooled.unsqueeze(1), None


def train_wordpiece(texts: Sequence[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer learned from `texts`, identical for identical texts.

    The vocabulary is the special tokens, every character (alone and as a `##` continuation) and
    then the most frequent whole words (ties broken alphabetically) up to `vocab_size`. The
    tokenizers library's own WordPiece trainer is not used: its vocabulary varies between processes.
    A `vocab_size` below the special tokens and characters the text needs is refused: it would train
    a larger, characters-only vocabulary than asked for.
    """
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({ch for word in counts for ch in word})
    vocab = list(SPECIAL_TOKENS) + alphabet + [f"##{ch}" for ch in alphabet]
    if vocab_size < len(vocab):
        raise ConfigError(
            f"model.text.tokenizer_vocab_size={vocab_size} is smaller than the {len(vocab)} tokens the "
            f"training text needs before any word ({len(SPECIAL_TOKENS)} special tokens and its {len(alphabet)} "
            f"characters, alone and as ## continuations): give at least {len(vocab)}"
        )
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    vocab += words[: max(0, vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return _wrap(tokenizer)


def tokenizer_from_json(serialised: str):
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_str(serialised))


def _wrap(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tokenizer(cfg: TextConfig, train_texts: Sequence[str], saved_json: Optional[str] = None):
    """The tokenizer: loaded with the pretrained model, restored from a checkpoint, or trained."""
    if cfg.source is TextSource.pretrained:
        from transformers import AutoTokenizer

        return _from_pretrained(AutoTokenizer, cfg)
    if saved_json is not None:
        return tokenizer_from_json(saved_json)
    return train_wordpiece(train_texts, cfg.tokenizer_vocab_size)


def serialise_tokenizer(cfg: TextConfig, tokenizer) -> Optional[str]:
    """What a checkpoint must carry to rebuild the tokenizer (nothing for pretrained ones)."""
    if cfg.source is TextSource.pretrained:
        return None
    return tokenizer.backend_tokenizer.to_str()


def build_text_encoder(cfg: TextConfig, tokenizer) -> TextEncoder:
    from transformers import AutoConfig, AutoModel

    if cfg.source is TextSource.pretrained:
        backbone = _from_pretrained(AutoModel, cfg, attn_implementation=TextAttention(cfg.attention).value)
    else:
        if not cfg.model_config:
            raise ValueError(f"model.text '{cfg.name}': source=config needs model_config")
        kwargs: dict[str, Any] = dict(to_plain(cfg.model_config))
        model_type = kwargs.pop("model_type")
        special = {
            f"{n}_token_id": tokenizer.convert_tokens_to_ids(t)
            for n, t in (("pad", "[PAD]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("bos", "[CLS]"), ("eos", "[SEP]"))
        }
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **special, **kwargs)
        backbone = AutoModel.from_config(config, attn_implementation=TextAttention(cfg.attention).value)
    return TextEncoder(backbone, cfg.output, cfg.pooling)


def _from_pretrained(factory, cfg: TextConfig, **kwargs):
    """A local directory as is; a hub id from the cache, or the hub when it is reachable."""
    from pathlib import Path

    from mdfnet_hydra.models.hub import hub_reachable, unavailable

    if not cfg.name_or_path:
        raise ValueError("model.text.name_or_path is required for source=pretrained")
    if Path(cfg.name_or_path).expanduser().is_dir():
        return factory.from_pretrained(str(Path(cfg.name_or_path).expanduser()), **kwargs)
    try:
        return factory.from_pretrained(cfg.name_or_path, local_files_only=not hub_reachable(), **kwargs)
    except OSError as err:
        raise unavailable(
            "text encoder", cfg.name_or_path, "model.text.name_or_path=<local model directory>", err
        ) from err
