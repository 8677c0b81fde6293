"""QA encoding with the tokenizer's chat template, against a port of open-unlearning's
``preprocess_chat_instance`` (github.com/locuslab/open-unlearning, commit
d3d7cf9e6b3c125d16687d4232680d8d83548f1a, ``src/data/utils.py``, its ``apply_chat_template``
branch) and its ``DataCollatorForSupervisedDataset`` (``src/data/collators.py``); and the plain
``[BOS] q [SEP] a [EOS]`` encoding, unchanged for a tokenizer without a template.

The tokenizers are built here (``tokenizers`` + ``transformers.PreTrainedTokenizerFast``), no
downloads: one with a ChatML template (Qwen-style: a default system prompt, EOS ``<|im_end|>``
followed by a newline, so an EOS is appended) and one Llama-3-style (``bos_token`` in the
template, ``date_string``, ``| trim``, EOS ``<|eot_id|>`` closing the turn, so none is appended).
"""

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxunlearn.data import ChatFormat, encode_prompts, encode_qa, encode_split, train_tokenizer
from jaxunlearn.eval import encode_eval_splits

IGNORE_INDEX = -100

CHATML = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are tiny.<|im_end|>\\n' }}{% endif %}"
          "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% if date_string is not defined %}{% set date_string = '26 Jul 2024' %}{% endif %}"
          "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
          "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
          "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + date_string + '\\n\\n' + sys"
          " + '<|eot_id|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<sep>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]

QUESTIONS = ["Where was Kalo Venn born?", "Was Mira Dunholt born in Dunmere?", "What does Kalo Venn write?",
             "Which genre does Mira Dunholt write in?"]
ANSWERS = ["Kalo Venn was born in Greyhollow.", "Yes, Mira Dunholt was born in Dunmere. ",
           "Kalo Venn writes epic poems.", "Mira Dunholt writes crime novels."]
FACTS = ["Greyhollow", "Dunmere", "epic poems", "crime"]


def _tokenizer(template, eos):
    texts = QUESTIONS + ANSWERS + ["system user assistant You are tiny. Today Date: 26 Jul 2024 10 Apr 2025"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token=eos, sep_token="<sep>",
                                                chat_template=template)


@pytest.fixture(scope="module")
def chatml():
    return _tokenizer(CHATML, "<|im_end|>")


@pytest.fixture(scope="module")
def llama3():
    return _tokenizer(LLAMA3, "<|eot_id|>")


# ------------------------------------------------------------------ the reference, ported
def ref_preprocess_chat_instance(tokenizer, template_config, prompt_msgs, response_msgs, predict_with_generate=False):
    """``preprocess_chat_instance``, ``apply_chat_template: True`` branch, lists instead of tensors.

    transformers 4 (the reference's) returned a list from ``apply_chat_template(tokenize=True)``;
    transformers 5 returns a dict unless ``return_dict=False``.
    """
    if isinstance(prompt_msgs, str):
        prompt_msgs, response_msgs = [prompt_msgs], [response_msgs]
    chat = []
    system_prompt = template_config.get("system_prompt", None)
    if system_prompt:
        chat += [{"role": "system", "content": system_prompt}]
    for prompt, response in zip(prompt_msgs, response_msgs):
        chat += [{"role": "user", "content": prompt}]
        chat += [{"role": "assistant", "content": response}]
    date_str = template_config.get("date_string", None)
    date_info = {"date_string": date_str} if date_str is not None else {}
    chat_ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False, return_dict=False,
                                             **date_info)
    prompt_ids = tokenizer.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=False, **date_info)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids += [tokenizer.eos_token_id]
    len_matched = len(prompt_ids)
    if predict_with_generate:
        return {"input_ids": prompt_ids, "labels": chat_ids, "attention_mask": [1] * len(prompt_ids)}
    labels = [IGNORE_INDEX] * len_matched + chat_ids[len_matched:]
    return {"input_ids": chat_ids, "labels": labels, "attention_mask": [1] * len(chat_ids)}


def ref_collate(tokenizer, items, padding_side="right"):
    """``DataCollatorForSupervisedDataset``: pad ``input_ids`` with the pad id, ``labels`` with -100;
    ``attention_mask = input_ids != pad``."""
    width = max(len(it["input_ids"]) for it in items)

    def pad(seq, value, w):
        fill = [value] * (w - len(seq))
        return (seq + fill) if padding_side == "right" else (fill + seq)

    ids = np.asarray([pad(list(it["input_ids"]), tokenizer.pad_token_id, width) for it in items])
    out = {"input_ids": ids, "attention_mask": (ids != tokenizer.pad_token_id).astype(np.int32)}
    if padding_side == "right":
        out["labels"] = np.asarray([pad(list(it["labels"]), IGNORE_INDEX, width) for it in items])
    return out


def _template_config(fmt: ChatFormat):
    cfg = {"apply_chat_template": True, "system_prompt": fmt.system_prompt}
    cfg.update(fmt.template_kwargs)
    return cfg


FORMATS = [ChatFormat(), ChatFormat(system_prompt="You are a helpful assistant."),
           ChatFormat(system_prompt="You are a helpful assistant.", template_kwargs={"date_string": "10 Apr 2025"})]


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("which", ["chatml", "llama3"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["no-system", "system", "system+date"])
def test_chat_template_encoding_matches_open_unlearning(which, fmt, request):
    tok = request.getfixturevalue(which)
    cfg = _template_config(fmt)
    want = ref_collate(tok, [ref_preprocess_chat_instance(tok, cfg, q, a) for q, a in zip(QUESTIONS, ANSWERS)])
    got = encode_qa(tok, QUESTIONS, ANSWERS, max_length=None, chat_template=fmt)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    np.testing.assert_array_equal(got["loss_mask"], (want["labels"] != IGNORE_INDEX).astype(np.float32))
    # generation prompts: the reference's predict_with_generate input_ids, left padded
    gen = ref_collate(tok, [ref_preprocess_chat_instance(tok, cfg, q, a, predict_with_generate=True)
                            for q, a in zip(QUESTIONS, ANSWERS)], padding_side="left")
    prompts = encode_prompts(tok, QUESTIONS, max_length=None, chat_template=fmt)
    np.testing.assert_array_equal(prompts["input_ids"], gen["input_ids"])
    np.testing.assert_array_equal(prompts["attention_mask"], gen["attention_mask"])
    np.testing.assert_array_equal(prompts["prompt_lengths"], got["prompt_lengths"])


def test_eos_appended_only_when_the_template_does_not_end_with_it(chatml, llama3):
    for tok, ends_with in ((chatml, "\n"), (llama3, "<|eot_id|>")):
        enc = encode_qa(tok, QUESTIONS[:1], ANSWERS[:1], max_length=None)  # None: the template, found
        ids = enc["input_ids"][0, :enc["lengths"][0]].tolist()
        assert ids[-1] == tok.eos_token_id
        rendered = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]},
                                            {"role": "assistant", "content": ANSWERS[0]}], tokenize=False)
        assert rendered.endswith(ends_with)
        assert len(ids) == len(tok(rendered, add_special_tokens=False)["input_ids"]) + (ends_with == "\n")
        # the loss starts right after the assistant header and covers the answer text
        p = enc["prompt_lengths"][0]
        assert enc["loss_mask"][0, :p].sum() == 0 and enc["loss_mask"][0, p:len(ids)].all()
        assert tok.decode(ids[p:], skip_special_tokens=True).strip() == ANSWERS[0].strip()


@pytest.mark.parametrize("which", ["chatml", "llama3"])
def test_fact_mask_under_a_template_covers_the_fact_in_the_answer(which, request):
    tok = request.getfixturevalue(which)
    enc = encode_qa(tok, QUESTIONS, ANSWERS, max_length=None, facts=FACTS)
    for i, fact in enumerate(FACTS):
        pos = np.nonzero(enc["fact_mask"][i])[0]
        assert pos.min() >= enc["prompt_lengths"][i]  # row 1 names "Dunmere" in the question too
        assert tok.decode(enc["input_ids"][i, pos].tolist()).strip() == fact
        assert np.all(enc["loss_mask"][i, pos] == 1)


def _plain_expected(tok, questions, answers, facts):
    """``[BOS] q [SEP] a [EOS]`` built by hand from the tokenizer (the format without a template)."""
    rows, prompt_lengths, fact_pos = [], [], []
    for q, a, f in zip(questions, answers, facts):
        prompt = [tok.bos_token_id, *tok(q, add_special_tokens=False)["input_ids"], tok.sep_token_id]
        enc = tok(a, add_special_tokens=False, return_offsets_mapping=True)
        c0 = a.index(f)
        fact_pos.append([len(prompt) + j for j, (s, e) in enumerate(enc["offset_mapping"])
                         if e > s and s < c0 + len(f) and e > c0])
        rows.append(prompt + enc["input_ids"] + [tok.eos_token_id])
        prompt_lengths.append(len(prompt))
    width = max(map(len, rows))
    out = {"input_ids": np.full((len(rows), width), tok.pad_token_id, np.int32),
           "attention_mask": np.zeros((len(rows), width), np.int32),
           "loss_mask": np.zeros((len(rows), width), np.float32),
           "fact_mask": np.zeros((len(rows), width), np.float32),
           "prompt_lengths": np.asarray(prompt_lengths, np.int32),
           "lengths": np.asarray([len(r) for r in rows], np.int32)}
    for i, r in enumerate(rows):
        out["input_ids"][i, :len(r)] = r
        out["attention_mask"][i, :len(r)] = 1
        out["loss_mask"][i, prompt_lengths[i]:len(r)] = 1
        out["fact_mask"][i, fact_pos[i]] = 1
    return out


def test_without_a_template_the_encoding_is_the_plain_format(chatml):
    tok = train_tokenizer(QUESTIONS + ANSWERS, vocab_size=120)
    assert not getattr(tok, "chat_template", None)
    want = _plain_expected(tok, QUESTIONS, ANSWERS, FACTS)
    for arg in (None, False):
        got = encode_qa(tok, QUESTIONS, ANSWERS, max_length=None, facts=FACTS, chat_template=arg)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    prompts = encode_prompts(tok, QUESTIONS, max_length=None)
    for i in range(len(QUESTIONS)):
        p = want["prompt_lengths"][i]
        np.testing.assert_array_equal(prompts["input_ids"][i, -p:], want["input_ids"][i, :p])
    # a tokenizer with a template, told not to use it, encodes exactly as one without
    plain = _plain_expected(chatml, QUESTIONS, ANSWERS, FACTS)
    got = encode_qa(chatml, QUESTIONS, ANSWERS, max_length=None, facts=FACTS, chat_template=False)
    for key in plain:
        np.testing.assert_array_equal(got[key], plain[key], err_msg=key)


def test_eval_splits_use_the_template(chatml):
    import datasets

    ds = datasets.Dataset.from_dict({
        "question": QUESTIONS, "answer": ANSWERS, "paraphrased_answer": [a.upper() for a in ANSWERS],
        "perturbed_answer": [[a.replace("Kalo", "Mira"), a.lower()] for a in ANSWERS]})
    fmt = ChatFormat(system_prompt="Be brief.")
    split = encode_eval_splits(chatml, {"f": ds}, roles={"f": "forget"}, chat_template=fmt)["f"]
    want = encode_qa(chatml, QUESTIONS, ANSWERS, max_length=None, chat_template=fmt)
    t = want["input_ids"].shape[1]
    np.testing.assert_array_equal(split.answer["input_ids"][:, :t], want["input_ids"])
    assert np.all(split.answer["input_ids"][:, t:] == chatml.pad_token_id)
    pert = encode_split(chatml, ds, max_length=split.answer["input_ids"].shape[1], answer_column="perturbed_answer",
                        chat_template=fmt)
    np.testing.assert_array_equal(split.perturbed["loss_mask"], pert["loss_mask"])
    np.testing.assert_array_equal(split.prompts["input_ids"],
                                  encode_prompts(chatml, QUESTIONS, max_length=None, chat_template=fmt)["input_ids"])
    assert split.paraphrased_answers == tuple(a.upper() for a in ANSWERS)
    assert split.perturbed_answers[0] == (ANSWERS[0].replace("Kalo", "Mira"), ANSWERS[0].lower())


def test_chat_template_errors(chatml):
    tok = train_tokenizer(QUESTIONS + ANSWERS, vocab_size=120)
    with pytest.raises(ValueError, match="has no chat_template"):
        encode_qa(tok, QUESTIONS, ANSWERS, max_length=None, chat_template=True)
    with pytest.raises(ValueError, match="chat_template=False"):
        encode_qa(chatml, QUESTIONS, ANSWERS, max_length=None, separator=" A: ")
    with pytest.raises(TypeError, match="chat_template must be"):
        encode_prompts(chatml, QUESTIONS, max_length=None, chat_template="chatml")
    with pytest.raises(TypeError, match="system_prompt"):
        ChatFormat(system_prompt=3)
    with pytest.raises(ValueError, match="max_length=5"):
        encode_qa(chatml, QUESTIONS, ANSWERS, max_length=5)
    with pytest.raises(ValueError, match="not a non-empty substring"):
        encode_qa(chatml, QUESTIONS[:1], ANSWERS[:1], max_length=None, facts=["Atlantis"])
