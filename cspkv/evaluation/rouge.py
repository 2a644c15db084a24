"""ROUGE-L F exactly as MileBench computes it.

MileBench scores open-ended answers with `Rouge().get_scores(pred, gt)[0]["rouge-l"]["f"]` from
the `rouge` PyPI package (pinned to 1.0.1 in its requirements.txt). That package does not compute
the textbook sentence-level ROUGE-L; its quirks change the numbers, so they are reproduced here:

* Text is split into "sentences" on every ".", and each piece is whitespace-normalised. The
  emptiness test runs *before* normalisation, so a piece made only of spaces survives as "" and
  contributes an empty-string token.
* Words are counted as a *set*: m and n are the numbers of distinct words in the reference and the
  hypothesis, and the overlap is the number of distinct words in the union of the LCS word sets
  (summary-level "union LCS", with the package's default exclusive=True).
* Which LCS is reconstructed (when several exist) follows the package's backtracking tie-break,
  because with set semantics different LCSs can give different overlaps.
* F = 2 * (P * R) / (P + R + 1e-8), not the exact harmonic mean.
"""

from __future__ import annotations

__all__ = ["rouge_l_f", "sentences"]


def sentences(text: str) -> list[str]:
    """Split text the way the `rouge` package does before scoring."""
    # Filter on the raw piece, then normalise whitespace: keeps the package's empty-token quirk.
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentence: str) -> list[str]:
    # Split on single spaces (not str.split()): "" must become [""], as in the package.
    return sentence.split(" ")


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """Words of one longest common subsequence of ref and hyp, picked with the package's tie-break."""
    rows, cols = len(ref), len(hyp)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if ref[i - 1] == hyp[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    # Iterative version of the package's recursive backtrack (which can hit Python's recursion
    # limit on long texts); same choices: match -> diagonal, strictly-greater up -> up, else left.
    found: set[str] = set()
    i, j = rows, cols
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            found.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return found


def rouge_l_f(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure of `hypothesis` against `reference`, matching `rouge==1.0.1`.

    Raises ValueError when either text has no sentence (e.g. it is empty), as the package does.
    """
    hyp_sents, ref_sents = sentences(hypothesis), sentences(reference)
    if not hyp_sents or not ref_sents:
        raise ValueError("Collections must contain at least 1 sentence.")

    ref_vocab = {w for s in ref_sents for w in _words(s)}
    hyp_vocab = {w for s in hyp_sents for w in _words(s)}

    # Union over every (reference sentence, hypothesis sentence) pair of the LCS words.
    union: set[str] = set()
    for ref in ref_sents:
        ref_words = _words(ref)
        for hyp in hyp_sents:
            union |= _lcs_words(ref_words, _words(hyp))

    overlap = len(union)
    recall = overlap / len(ref_vocab)
    precision = overlap / len(hyp_vocab)
    # Same expression and evaluation order as the package, so the floats agree bit for bit.
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))
