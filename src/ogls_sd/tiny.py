"""The built-in tiny model: a char-level tokenizer with a chat template and a small Llama.

Used by the default run, the tests and the miniature experiments. Everything is built in-process:
nothing is downloaded.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<think>", "</think>", "<|unk|>"]

# Qwen3-style: enable_thinking=False pre-fills an empty think block after the assistant tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)


TINY_CONTEXT = 1024  # the built-in tiny model's context (max_position_embeddings)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (plus newline) and 8 special tokens."""
    chars = list(string.printable[:95]) + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", unk_token="<|unk|>", padding_side="left"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_llama(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 512,
               max_positions: int = TINY_CONTEXT, pad_token_id: int = 0, eos_token_id: int = 1) -> LlamaForCausalLM:
    """A small Llama with untied lm head (random init; seed torch first for reproducibility)."""
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)
