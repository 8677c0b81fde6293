"""ROUGE-L recall / F1 and the Porter stemmer against hand-computed cases and the ``rouge_score`` package."""

import numpy as np
import pytest

from jaxunlearn.eval.rouge import lcs_length, porter_stem, rouge_l, rouge_l_f1, rouge_l_recall, rouge_tokenize

# Porter (1980)'s worked examples, carried through all five steps, plus the NLTK-extension
# cases (irregular forms, 4-letter -ies/-ied, y -> i only after a consonant). The final stems
# are those of nltk.stem.porter.PorterStemmer() (NLTK_EXTENSIONS mode, what rouge_score uses).
PORTER_CASES = {
    "caresses": "caress", "ponies": "poni", "caress": "caress", "cats": "cat", "feed": "feed",
    "agreed": "agre", "plastered": "plaster", "bled": "bled", "motoring": "motor", "sing": "sing",
    "conflated": "conflat", "troubled": "troubl", "sized": "size", "hopping": "hop", "tanned": "tan",
    "falling": "fall", "hissing": "hiss", "fizzed": "fizz", "failing": "fail", "filing": "file",
    "happy": "happi", "relational": "relat", "conditional": "condit", "rational": "ration",
    "digitizer": "digit", "differentli": "differ", "vietnamization": "vietnam", "predication": "predic",
    "operator": "oper", "feudalism": "feudal", "decisiveness": "decis", "hopefulness": "hope",
    "callousness": "callous", "formaliti": "formal", "sensibiliti": "sensibl", "triplicate": "triplic",
    "formative": "form", "formalize": "formal", "electrical": "electr", "hopeful": "hope",
    "goodness": "good", "revival": "reviv", "allowance": "allow", "inference": "infer",
    "airliner": "airlin", "gyroscopic": "gyroscop", "adjustable": "adjust", "defensible": "defens",
    "irritant": "irrit", "replacement": "replac", "adjustment": "adjust", "dependent": "depend",
    "adoption": "adopt", "communism": "commun", "activate": "activ", "angulariti": "angular",
    "homologous": "homolog", "effective": "effect", "bowdlerize": "bowdler", "probate": "probat",
    "rate": "rate", "cease": "ceas", "controll": "control", "roll": "roll",
    "generalization": "gener", "oscillators": "oscil",
    # NLTK extensions
    "ties": "tie", "dies": "die", "cried": "cri", "dying": "die", "lying": "lie", "sky": "sky",
    "skies": "sky", "news": "news", "enjoy": "enjoy", "spy": "spi", "radicalli": "radic",
    "as": "as", "is": "is", "Running": "run",
}


def test_porter_stem_known_stems():
    got = {w: porter_stem(w) for w in PORTER_CASES}
    assert got == PORTER_CASES


def test_tokenize_like_rouge_score():
    assert rouge_tokenize("The Cats' toys, 1990!") == ["the", "cat", "toy", "1990"]
    # no stemming: only lowercase + non-alphanumerics as separators
    assert rouge_tokenize("Hello,   WORLD-wide   writers", use_stemmer=False) == ["hello", "world", "wide", "writers"]
    # tokens of <= 3 characters are never stemmed ("was" would otherwise become "wa")
    assert rouge_tokenize("was has its") == ["was", "has", "its"]
    assert rouge_tokenize("  ...  ") == []
    with pytest.raises(TypeError, match="str"):
        rouge_tokenize(None)


@pytest.mark.parametrize("a,b,want", [
    ("ABCBDAB", "BDCABA", 4),          # CLRS's example
    ("abcde", "edcba", 1),
    ("abc", "abc", 3),
    ("abc", "", 0),
    ("aaaa", "aa", 2),
    ("xaybzc", "abc", 3),
])
def test_lcs_length_hand_cases(a, b, want):
    assert lcs_length(list(a), list(b)) == want
    assert lcs_length(list(b), list(a)) == want


@pytest.mark.parametrize("target,prediction,recall,precision", [
    ("the cat sat on the mat", "the cat on mat", 4 / 6, 1.0),
    ("a b c d e", "e d c b a", 1 / 5, 1 / 5),
    ("Hello, world!", "hello world", 1.0, 1.0),
    ("The authors were writing novels", "author write novel", 3 / 5, 1.0),  # needs the stemmer
    ("born in 1990 in Paris", "Paris, 1990", 1 / 5, 1 / 2),                   # LCS = 1 (order matters)
    ("anything", "", 0.0, 0.0),
    ("", "anything", 0.0, 0.0),
])
def test_rouge_l_hand_cases(target, prediction, recall, precision):
    s = rouge_l(prediction, target)
    assert s.recall == pytest.approx(recall) and s.precision == pytest.approx(precision)
    f = 0.0 if recall + precision == 0 else 2 * recall * precision / (recall + precision)
    assert s.fmeasure == pytest.approx(f)


def test_stemmer_flag_changes_matching():
    assert rouge_l("author write novel", "The authors were writing novels", use_stemmer=False).recall == 0.0


def test_rouge_l_recall_vector_and_errors():
    got = rouge_l_recall(["the cat on mat", "x"], ["the cat sat on the mat", "y"])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [4 / 6, 0.0])
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        rouge_l_recall(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="single string"):
        rouge_l_recall("abc", "abc")


def test_matches_rouge_score_package_when_installed():
    from rouge_score import rouge_scorer
    rng = np.random.default_rng(0)
    words = ("The writer's novels were published in 1987 by Velmstadt Press; critics praised "
             "their running, generalizations and happy endings.").split()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for _ in range(200):
        t = " ".join(rng.choice(words, size=rng.integers(1, 12)))
        p = " ".join(rng.choice(words, size=rng.integers(0, 12)))
        want = scorer.score(t, p)["rougeL"]
        got = rouge_l(p, t)
        assert (got.precision, got.recall) == pytest.approx((want.precision, want.recall))


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_f1_and_recall_match_rouge_score(use_stemmer):
    """Per-example F1 and recall equal ``rouge_score``'s ``rougeL`` ``fmeasure`` / ``recall``
    (open-unlearning's ``rougeL_f1`` / ``rougeL_recall``; MUSE scores without stemming)."""
    from rouge_score import rouge_scorer

    rng = np.random.default_rng(1 + use_stemmer)
    words = ("The writer's novels were published in 1987 by Velmstadt Press; critics praised their running, "
             "generalizations, happy endings and hopeful; relational - DYING skies! caresses ponies").split()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    targets = [" ".join(rng.choice(words, size=rng.integers(0, 14))) for _ in range(300)]
    preds = [" ".join(rng.choice(words, size=rng.integers(0, 14))) for _ in range(300)]
    preds[:3] = ["", "!!", targets[2]]  # no token, punctuation only, exact copy
    want = [scorer.score(t, p)["rougeL"] for t, p in zip(targets, preds)]
    f1 = rouge_l_f1(preds, targets, use_stemmer=use_stemmer)
    rec = rouge_l_recall(preds, targets, use_stemmer=use_stemmer)
    assert f1.dtype == np.float64 and f1.shape == (300,)
    np.testing.assert_allclose(f1, [w.fmeasure for w in want], rtol=1e-12, atol=0)
    np.testing.assert_allclose(rec, [w.recall for w in want], rtol=1e-12, atol=0)
    assert 0 < f1.mean() < 1 and f1[2] == (1.0 if rouge_tokenize(targets[2]) else 0.0)


def test_f1_hand_case_and_errors():
    # target 6 tokens, prediction 5, LCS 4 ("the cat on mat"): P = 4/5, R = 4/6, F = 2PR/(P+R) = 8/11
    np.testing.assert_allclose(rouge_l_f1(["the cat on a mat"], ["the cat sat on the mat"]), [8 / 11])
    np.testing.assert_allclose(rouge_l_f1(["dog"], ["the cat"]), [0.0])
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        rouge_l_f1(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="single string"):
        rouge_l_f1("abc", ["abc"])
