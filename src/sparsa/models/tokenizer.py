"""The reference models' tokenizer: one token per byte (ids 0-255 are the byte values), plus three specials.

Byte-level keeps the tasks' token counts exact and predictable (a 7-digit value is 7 tokens everywhere) and
is the setting in which the project has measured that small models learn long-context retrieval
(shared/REFERENCE_MODELS.md). It is an ordinary ``PreTrainedTokenizerFast`` saved as ``tokenizer.json``, so
``AutoTokenizer.from_pretrained(model_dir)`` loads it like any Hugging Face tokenizer.
"""

from __future__ import annotations

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (what ByteLevel expects)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_tokenizer():
    """A fresh byte-level ``PreTrainedTokenizerFast`` (no files needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({PAD: PAD_ID, BOS: BOS_ID, EOS: EOS_ID})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="left", model_max_length=1 << 20)
