"""The embedded default's tokenizer: characters, built offline with the `tokenizers` library.

Wrapped as a ``PreTrainedTokenizerFast`` with a ChatML chat template and saved with
``save_pretrained``, so the rest of the system loads it with ``AutoTokenizer`` exactly like a
hub tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD, UNK, EOS, IM_START, IM_END = "<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, EOS, IM_START, IM_END)
# Every printable ASCII character, plus newline and tab.
CHARACTERS = tuple(dict.fromkeys(string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``; ids: specials first, then characters.

    The end of an assistant turn is ``<|im_end|>``, which is the tokenizer's eos token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,
        additional_special_tokens=[EOS, IM_START],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def save_char_tokenizer(directory: str | Path):
    """Build the tokenizer and ``save_pretrained`` it into ``directory``; returns it."""
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
