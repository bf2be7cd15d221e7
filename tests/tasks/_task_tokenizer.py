"""A real HF tokenizer for the task tests, trained in memory (no downloads).

Byte-level BPE like GPT-2's (" Mary" is one token with its leading space), with numbers
pre-split into pairs of digits (" 1732" -> " 17" "32", as GPT-2 splits years), trained on
every word of the packaged task data except ``LEFT_OUT`` names, which therefore stay
several tokens and must be filtered out by the generators. ``with_bos=True`` adds a
Llama-like BOS in front of every text. ``save_tiny_model`` writes it with a tiny GPT-2
(``save_pretrained``) into a folder, for tests that load a model from disk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DATA = Path(__file__).resolve().parents[2] / "edgeprune_fast" / "data" / "tasks"
LEFT_OUT = ("Victoria", "Jennifer", "Christopher")  # not in the corpus: multi-token names
SPECIALS = ["<|endoftext|>", "<|pad|>", "<s>"]


def corpus() -> list[str]:
    texts = []
    for file in sorted(DATA.glob("*.json")):
        texts.append(json.dumps(json.loads(file.read_text(encoding="utf-8")), ensure_ascii=False))
    words = set(re.findall(r"[A-Za-z']+|[^\sA-Za-z']", " ".join(texts)))
    words -= set(LEFT_OUT)
    lines = [" ".join(sorted(words))] * 3
    lines += [f"the year {y}{z:02d} he she" for y in range(10, 21) for z in range(100)]
    lines += ["My friend is Victor and his friend Chris toph"]  # pieces, never the whole left-out names
    return lines


def build_tokenizer(with_bos: bool = False):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\d\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=6000, min_frequency=1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    if with_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<s>" if with_bos else "<|endoftext|>")


def save_tiny_model(folder: Path, tokenizer=None, seed: int = 0) -> Path:
    """A tiny random GPT-2 (2 layers, 2 heads, width 32) and the test tokenizer, saved with
    ``save_pretrained`` into ``folder`` (loadable by AutoModelForCausalLM/AutoTokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
