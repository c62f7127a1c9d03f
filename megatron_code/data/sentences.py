"""--split-sentences: NLTK's punkt sentence splitter, as Megatron-LM's preprocess_data.py uses it.

Megatron-LM loads `tokenizers/punkt/<lang>.pickle` (from $NLTK_DATA when set) and splits each
text in pieces of at most 1,000,000 characters; `--keep-newlines` rebuilds the splitter with a
period context that keeps the whitespace after a sentence end, newlines included, in that
sentence. NLTK 3.9 and later refuse to load those pickles and ship the same models as
`punkt_tab`; that is used there instead.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from megatron_code.data.errors import DataError

_PIECE_CHARS = 1_000_000


def load_sentence_splitter(lang: str = "english", keep_newlines: bool = False) -> Callable[[str], list[str]]:
    """A function text -> sentences; DataError saying what to install when NLTK or its data is missing."""
    try:
        import nltk
        from nltk.tokenize import punkt
    except ImportError:
        raise DataError("--split-sentences needs NLTK and its punkt data: pip install nltk, then "
                        "python -m nltk.downloader punkt_tab") from None
    try:
        if hasattr(punkt, "PunktTokenizer"):  # NLTK >= 3.9: punkt_tab
            splitter = punkt.PunktTokenizer(lang)
        else:
            root = os.environ.get("NLTK_DATA")
            relative = os.path.join("tokenizers", "punkt", f"{lang}.pickle")
            splitter = nltk.load(f"file:{os.path.join(root, relative)}" if root else f"nltk:{relative}")
    except (LookupError, OSError, ValueError) as e:
        data = "punkt_tab" if hasattr(punkt, "PunktTokenizer") else "punkt"
        raise DataError(f"--split-sentences --lang {lang}: NLTK has no {data} model for it "
                        f"({type(e).__name__}); run python -m nltk.downloader {data} (or set NLTK_DATA to a "
                        "folder that holds it)") from None
    if keep_newlines:
        class KeepNewlines(punkt.PunktLanguageVars):
            # punkt's period context with the whitespace after a sentence end made optional and
            # the next token any non-space run, so that the whitespace stays in the sentence
            _period_context_fmt = r"""
                \S*                   # some word material
                %(SentEndChars)s      # a potential sentence ending
                \s*                   # any whitespace, newlines included, stays with the sentence
                (?=(?P<after_tok>
                    %(NonWord)s       # either other punctuation
                    |
                    (?P<next_tok>\S+) # or the next word
                ))"""
        splitter = punkt.PunktSentenceTokenizer(train_text=splitter._params, lang_vars=KeepNewlines())

    def split(text: str) -> list[str]:
        return [s for i in range(0, len(text), _PIECE_CHARS) for s in splitter.tokenize(text[i:i + _PIECE_CHARS])]
    return split
