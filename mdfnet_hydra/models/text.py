"""Clinical text encoder: any transformers encoder (ModernBERT, BERT, RoBERTa) via AutoModel, or a
test-size model built from a config with a WordPiece tokenizer trained on the training text."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from mdfnet_hydra.config import ConfigError, TextAttention, TextConfig, TextPooling, TextSource, TokenOutput, to_plain
from mdfnet_hydra.models.hub import first_line

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# what transformers' tokenizers read from a model directory
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


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
    """The tokenizer: loaded with the pretrained model, restored from a checkpoint, or trained. A
    pretrained one is checked against its model's config here, before any report is tokenized."""
    if cfg.source is TextSource.pretrained:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = _from_pretrained(AutoTokenizer, cfg)
        check_tokenizer(cfg, tokenizer, _from_pretrained(AutoConfig, cfg))
        return tokenizer
    if saved_json is not None:
        return tokenizer_from_json(saved_json)
    return train_wordpiece(train_texts, cfg.tokenizer_vocab_size)


def check_tokenizer(cfg: TextConfig, tokenizer, config) -> None:
    """Refuse a tokenizer that does not fit its model: one that would turn every report into
    unknown tokens, ids past the embedding table (an IndexError, a device-side assert on a GPU),
    or batches that cannot be padded.

    The rule for a vocabulary that was not found: transformers builds a tokenizer of only its
    special tokens (5 for BERT) when a directory lacks the tokenizer files, and trains on all-[UNK]
    text without a word. A tokenizer with no token beyond its special ones, or with fewer than half
    the model's vocab_size, is refused (real tokenizers hold all of vocab_size, or all but a
    padding to a multiple of 64 or 128)."""
    where = f"model.text.name_or_path={cfg.name_or_path}"
    size, vocab_size = len(tokenizer), int(getattr(config, "vocab_size", 0) or 0)
    words = size - len(set(tokenizer.all_special_ids))
    if words <= 0 or (vocab_size and size < vocab_size // 2):
        raise ConfigError(
            f"{where}: its tokenizer holds {size} tokens ({words} beyond the special tokens) for a model of "
            f"vocab_size {vocab_size}: the vocabulary was not found ({_tokenizer_files(cfg)}), so every report "
            "would be unknown tokens; copy the tokenizer files saved with the model into its directory"
        )
    if vocab_size and size > vocab_size:
        raise ConfigError(
            f"{where}: its tokenizer has {size} tokens but the model's vocab_size is {vocab_size} (config.json): "
            f"ids from {vocab_size} on have no embedding; use the tokenizer saved with this model"
        )
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            f"{where}: its tokenizer has no pad token (pad_token in tokenizer_config.json), so reports of "
            'different lengths cannot be batched; add the model\'s pad token (e.g. "pad_token": "[PAD]") there'
        )


def _tokenizer_files(cfg: TextConfig) -> str:
    """Which tokenizer files a local directory has and lacks (a hub id: its cache's copy)."""
    from pathlib import Path

    directory = Path(str(cfg.name_or_path)).expanduser()
    if not directory.is_dir():
        return "the tokenizer files of the hub copy"
    missing = [name for name in TOKENIZER_FILES if not (directory / name).exists()]
    return f"{directory} has no {', '.join(missing)}"


def serialise_tokenizer(cfg: TextConfig, tokenizer) -> Optional[str]:
    """What a checkpoint must carry to rebuild the tokenizer (nothing for pretrained ones)."""
    if cfg.source is TextSource.pretrained:
        return None
    return tokenizer.backend_tokenizer.to_str()


def build_text_encoder(cfg: TextConfig, tokenizer) -> TextEncoder:
    """The backbone, checked at build time for every entry point: it must take max_length tokens and
    be an encoder (each token sees the whole report). A pretrained tokenizer was checked against
    the same config.json where build_tokenizer loaded it."""
    from transformers import AutoModel

    attention = TextAttention(cfg.attention).value
    if cfg.source is TextSource.pretrained:
        backbone = _from_pretrained(AutoModel, cfg, attn_implementation=attention)
    else:
        config = _model_config(cfg, tokenizer)
        try:
            backbone = AutoModel.from_config(config, attn_implementation=attention)
        except ValueError as err:  # e.g. hidden_size not a multiple of num_attention_heads
            raise ConfigError(f"model.text.model_config: {first_line(err)}; change the sizes it names") from err
    check_positions(cfg, backbone)
    check_bidirectional(cfg, backbone)
    return TextEncoder(backbone, cfg.output, cfg.pooling)


# set by the code from the tokenizer trained on the training text: not model_config keys
FROM_TOKENIZER = ("vocab_size", "pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id")


def _model_config(cfg: TextConfig, tokenizer):
    """The transformers config of model.text.model_config (source=config). A key the config class
    does not know would be kept as an unused attribute (a misspelt hidden_size trains at the
    default size): refused with the closest known key."""
    from transformers import AutoConfig

    if not cfg.model_config:
        raise ConfigError(
            "model.text.model_config is empty: source=config builds the text encoder from it; give its "
            "model_type and sizes (see conf/model/text/tiny_modernbert.yaml) or use source=pretrained"
        )
    kwargs: dict[str, Any] = dict(to_plain(cfg.model_config))
    config_class = _config_class(kwargs.pop("model_type", None))
    given = [key for key in FROM_TOKENIZER if key in kwargs]
    if given:
        raise ConfigError(
            f"model.text.model_config.{given[0]} is set from the tokenizer trained on the training text "
            f"({', '.join(FROM_TOKENIZER)}): remove it (model.text.tokenizer_vocab_size sets the vocabulary's size)"
        )
    known = _config_keys(config_class)
    for key in kwargs:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else f"see {config_class.__name__}'s documentation"
            raise ConfigError(
                f"model.text.model_config.{key} is not a setting of {config_class.__name__} "
                f"(model_type={config_class.model_type}), which would ignore it: {hint}"
            )
    special = {
        f"{n}_token_id": tokenizer.convert_tokens_to_ids(t)
        for n, t in (("pad", "[PAD]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("bos", "[CLS]"), ("eos", "[SEP]"))
    }
    return AutoConfig.for_model(config_class.model_type, vocab_size=len(tokenizer), **special, **kwargs)


def _config_class(model_type: Optional[str]):
    """transformers' config class of `model_type`; a missing or unknown one refused in one line."""
    from transformers import CONFIG_MAPPING

    if not model_type:
        raise ConfigError(
            "model.text.model_config has no model_type: give the transformers architecture, "
            "e.g. model.text.model_config.model_type=modernbert (or bert, roberta)"
        )
    if model_type not in CONFIG_MAPPING:
        import difflib

        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ConfigError(
            f"model.text.model_config.model_type={model_type} is not a transformers model type"
            + (f": did you mean {', '.join(close)}?" if close else ": e.g. modernbert, bert, roberta")
        )
    return CONFIG_MAPPING[model_type]


def _config_keys(config_class) -> set[str]:
    """The keys `config_class` takes: its defaults, its __init__ arguments, its settable properties,
    and the older names its __init__ takes from **kwargs (`kwargs.get("...")` / `kwargs.pop("...")`
    in its source: ModernBERT's global_attn_every_n_layers becomes layer_types). Any other key
    would be kept as an attribute the model never reads."""
    import ast
    import inspect
    import textwrap

    keys = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters)
    keys |= {name for name, value in inspect.getmembers(config_class) if isinstance(value, property) and value.fset}
    keys -= {"self", "kwargs", "args"}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(config_class)))
    except (OSError, TypeError, SyntaxError):  # source not shipped: the defaults and arguments only
        return keys
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "kwargs"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            keys.add(node.args[0].value)
    return keys


def check_positions(cfg: TextConfig, backbone: nn.Module) -> None:
    """Refuse a model.text.max_length longer than the model's positions. A RoBERTa-family model
    numbers its positions from padding_idx + 1 (its embeddings keep `padding_idx`), so it takes
    max_position_embeddings - padding_idx - 1 tokens (514 - 1 - 1 = 512 for roberta-base)."""
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if not positions or getattr(backbone.config, "position_biased_input", True) is False:
        return  # (DeBERTa-v2/v3 without absolute positions: relative ones take longer inputs)
    offset = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    limit = int(positions) - (int(offset) + 1 if isinstance(offset, int) else 0)
    if int(cfg.max_length) > limit:
        raise ConfigError(
            f"model.text.max_length={cfg.max_length} is longer than the text encoder takes ({limit} tokens: "
            f"max_position_embeddings={positions}{f' - padding_idx {offset} - 1' if limit != positions else ''}); "
            f"give model.text.max_length={limit} or less"
        )


def check_bidirectional(cfg: TextConfig, backbone: nn.Module) -> None:
    """Refuse a causal (decoder-only) model such as GPT-2: its first token sees no later token, so
    output=pooled with cls pooling gives every report the same feature, and its token states see
    only the report's start. transformers' `is_decoder` is not set for GPT-2, so a model type that
    transformers builds as a causal LM and never as a masked LM counts as causal too (BERT and
    RoBERTa are both and are encoders unless `is_decoder`; ModernBERT is a masked LM only)."""
    from transformers.models.auto import modeling_auto

    config = backbone.config
    model_type = getattr(config, "model_type", None)
    causal_lm = model_type in getattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {})
    masked_lm = model_type in getattr(modeling_auto, "MODEL_FOR_MASKED_LM_MAPPING_NAMES", {})
    if getattr(config, "is_decoder", False) or (causal_lm and not masked_lm):
        what = f"name_or_path={cfg.name_or_path}" if cfg.source is TextSource.pretrained else "model_config"
        raise ConfigError(
            f"model.text.{what} is a causal (decoder-only, {model_type}) model: its first token does not "
            "see the rest of the report, so every report would get the same pooled feature; use a "
            "bidirectional encoder (BERT, RoBERTa, ModernBERT)"
        )


def _from_pretrained(factory, cfg: TextConfig, **kwargs):
    """A local directory as is; a hub id from the cache, or the hub when it is reachable. What a
    directory lacks or holds damaged is refused in one line naming it."""
    from mdfnet_hydra.models.hub import hub_reachable, unavailable

    directory = local_directory(cfg.name_or_path)
    if directory is not None:
        return _load_local(factory, directory, **kwargs)
    try:
        return factory.from_pretrained(cfg.name_or_path, local_files_only=not hub_reachable(), **kwargs)
    except OSError as err:
        raise unavailable(
            "text encoder", str(cfg.name_or_path), "model.text.name_or_path=<local model directory>", err
        ) from err


def local_directory(name_or_path: Optional[str]):
    """The directory name_or_path names, None for a hub id. A path (/, ./, ../, ~) that is not a
    directory is refused here: the hub's 'not in the cache' would mislead."""
    from pathlib import Path

    if not name_or_path:
        raise ConfigError(
            "model.text.name_or_path is not set: source=pretrained needs a model directory or hub id "
            "(or use source=config with model_config)"
        )
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not name_or_path.startswith(("/", "./", "../", "~")):
        return None
    if path.exists():
        raise ConfigError(
            f"model.text.name_or_path={name_or_path} is a file: give the model's directory (the one holding config.json)"
        )
    raise ConfigError(f"model.text.name_or_path={name_or_path}: no such directory; give a saved model's directory")


def _load_local(factory, directory, **kwargs):
    """factory.from_pretrained on a local directory; a library error becomes one line."""
    import pickle

    from safetensors import SafetensorError

    where = f"model.text.name_or_path={directory}"
    if not (directory / "config.json").is_file():
        hint = " (an open_clip image model goes in model.vision.name_or_path=local-dir:...)"
        if not (directory / "open_clip_config.json").is_file():
            hint = ""
        raise ConfigError(
            f"{where} has no config.json: not a saved transformers model{hint}; give the model's directory"
        )
    try:
        return factory.from_pretrained(str(directory), **kwargs)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused code in a pickle
        raise ConfigError(
            f"{where}: its pytorch_model.bin is refused: a pickle holding more than tensors (code may run on "
            "loading); use a model.safetensors copy from a source you trust"
        ) from err
    except (OSError, ValueError, SafetensorError) as err:
        raise ConfigError(
            f"{where}: cannot load its {factory.__name__[4:].lower() or 'model'} ({first_line(err)}); "
            "copy the whole saved model (config.json, weights, tokenizer files) again"
        ) from err
