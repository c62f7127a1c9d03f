"""Tokenizers of every kind users bring, trained here on the tiny corpus, and documents that
stress them: shared by the preprocessing tests and the comparison with Megatron-LM's tool."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm

from megatron_code.data.tokenizer import hf_tokenizer_dir


@dataclass(frozen=True)
class Zoo:
    sp_default: Path
    """SentencePiece with all its defaults: unigram, nmt_nfkc, dummy prefix, no byte fallback."""
    sp_llama: Path
    """SentencePiece defaults with BPE and byte fallback: the kind Llama-2 and Mistral ship."""
    sp_own: Path
    """tools/train_tokenizer.py's BPE (verbatim text, control symbols at fixed ids)."""
    hf_own: Path
    """Its Hugging Face folder."""
    gpt2_vocab: Path
    gpt2_merges: Path
    """GPT-2 style byte-level BPE files written by the `tokenizers` library."""
    hf_gpt2: Path
    """The same as a Hugging Face folder, with an eos token and no pad token."""


SPECIAL_STRINGS = "<EOD> <s> </s> <unk> <pad> <PAD> <BOS> <CLS><SEP><MASK> <|endoftext|> <|user|> [INST]"
TRICKY_TEXTS = [
    f"literal special tokens: {SPECIAL_STRINGS} and again<EOD>glued<s>",
    "<EOD>",
    "<s> starts, ends </s>",
    "NUL \x00 inside, and \x00\x00 twice",
    "CRLF line\r\nnext line\r\n\r\n",
    "\ttabs\t\tand\t\n\tindented\n",
    " " * 300 + "long run of spaces" + " " * 40 + "\n" * 12 + "\u3000\u00a0\u2009 other spaces",
    "CJK 日本語の文章です。中文句子。한국어 문장.",
    "emoji 😀👍🏽 👨‍👩‍👧 and flags 🇫🇷",
    "accents: e\u0301 é Å ﬁ ① ＡＢＣ ½ ™ \u00b4",
    "",
    "   ",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # code\n",
    "mixed ▁ U+2581 and _underscore_ and 12345 67.89",
    "letters newer than some regex engines: a\u0558b \u0560\u0588 \u1c90\u1cba \U0001e900 \u08be",
]
LONE_SURROGATE = "text with a lone surrogate \ud800 in it"


def write_jsonl(path: Path, rows: list) -> Path:
    """JSON lines; a str row is written as it is (for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus_rows(tiny_corpus, per_source: int = 40) -> list[dict]:
    """Documents from the text and code corpora, the tricky texts, and sentence lists."""
    rows = [json.loads(line) for path in (tiny_corpus.text, tiny_corpus.code)
            for line in path.read_text(encoding="utf-8").splitlines()[:per_source]]
    rows = [{"text": r["text"]} for r in rows]
    rows += [{"text": t} for t in TRICKY_TEXTS]
    rows += [{"text": ["pre-split ", "", "sentences <EOD>", ""]}, {"text": []}, {"text": ["", ""]}]
    return rows


def build_zoo(tiny_corpus, root: Path) -> Zoo:
    texts = [json.loads(line)["text"] for path in (tiny_corpus.text, tiny_corpus.code)
             for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [s for t in texts for s in t.splitlines() if s.strip()]
    root.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(root / "default"),
                                   vocab_size=1000, minloglevel=2, num_threads=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(root / "llama"),
                                   vocab_size=1000, model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=2)
    return Zoo(root / "default.model", root / "llama.model", tiny_corpus.tokenizer,
               hf_tokenizer_dir(tiny_corpus.tokenizer), *_gpt2_files(texts, root))


def _gpt2_files(texts: list[str], root: Path) -> tuple[Path, Path, Path]:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1200, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    (root / "gpt2").mkdir()
    vocab, merges = bpe.save_model(str(root / "gpt2"))  # vocab.json, merges.txt
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    hf.save_pretrained(root / "gpt2_hf")
    return Path(vocab), Path(merges), root / "gpt2_hf"


@pytest.fixture(scope="session")
def zoo(tiny_corpus, tmp_path_factory) -> Zoo:
    """All of the above, trained once per session (a few seconds)."""
    return build_zoo(tiny_corpus, tmp_path_factory.mktemp("zoo"))


def write_punkt_model(tiny_corpus, nltk_data: Path) -> Path:
    """A punkt sentence splitter trained on the tiny corpus's prose, saved where NLTK < 3.9 and
    Megatron-LM's tool look for `--lang english` under $NLTK_DATA (NLTK reads
    tokenizers/punkt/english.pickle from its PY3/ folder)."""
    import pickle

    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

    trainer = PunktTrainer()
    trainer.train(tiny_corpus.text.read_text(encoding="utf-8"), finalize=True)
    path = nltk_data / "tokenizers" / "punkt" / "PY3" / "english.pickle"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(PunktSentenceTokenizer(trainer.get_params())))
    return nltk_data
