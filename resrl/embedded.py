"""The embedded default policy: a tiny Qwen2 model and a byte-level tokenizer built
locally, so nothing is downloaded.

The tokenizer is Qwen2's scheme with no merges: Qwen2's pre-tokenizer regex and
byte-level alphabet, 256 byte tokens plus Qwen's special tokens. Because it matches
Qwen2's own pre-tokenizer, `AutoTokenizer` (which picks the Qwen2 class from the
model's config) and vLLM read it exactly as built.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenization pattern (splits digits one by one, keeps a leading space
# with punctuation runs).
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# A ChatML template, so chat-formatted data works with the embedded model too.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def build_tiny_model(tiny_cfg, vocab_size: int, eos_id: int, seed: int):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_layers,
        num_attention_heads=tiny_cfg.num_heads,
        num_key_value_heads=tiny_cfg.num_kv_heads,
        max_position_embeddings=tiny_cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return model


def save_model_folder(out_dir: Path, model, tokenizer) -> Path:
    """A model with the project's tokenizer as an HF folder (safetensors) that transformers and vLLM load."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Name the class explicitly: the default ("TokenizersBackend") is transformers-5 only.
    cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    return out_dir


def save_embedded_base(out_dir: Path, tiny_cfg, seed: int) -> Path:
    """Write tokenizer + randomly initialised tiny Qwen2 to `out_dir` (HF format)."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tiny_cfg, len(tokenizer), tokenizer.eos_token_id, seed)
    return save_model_folder(out_dir, model, tokenizer)
