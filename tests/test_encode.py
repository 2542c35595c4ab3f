"""Text formats, label masks, padding and truncation of the task encoder, checked token by token."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from reckoning_ray.core.data.encode import (
    IGNORE_INDEX,
    METHODS,
    EncodeError,
    Encoder,
    TaskBatch,
    in_context_prompt,
    normalize_fact,
    normalize_label,
    reckoning_prompt,
    split_facts,
    target_text,
)
from reckoning_ray.core.data.schema import make_record
from reckoning_ray.core.modeling import build_tokenizer

PW = make_record(
    id="pw-0",
    family="proofwriter",
    source="generated",
    knowledge=["Bob is red.", "Anne is big.", "If someone is red then they are kind."],
    facts=["Bob is red.", "If someone is red then they are kind."],
    question="Bob is kind.",
    answer="yes",
    hops=1,
)
CL = make_record(
    id="cl-0",
    family="clutrr",
    source="generated",
    knowledge=["Jason is the father of Lisa.", "Tom is the brother of Lisa."],
    facts=["Jason is the father of Lisa.", "Tom is the brother of Lisa."],
    question="How is Tom related to Jason?",
    answer="son",
    hops=2,
)
# A task with no relevant facts (ProofWriter "none") and a short question.
PW_NONE = make_record(
    id="pw-1",
    family="proofwriter",
    source="generated",
    knowledge=["Dave is cold."],
    facts=[],
    question="Erin is cold.",
    answer="none",
    hops=0,
)
OTHER = [
    make_record(
        id=f"other-{i}",
        family="proofwriter",
        source="generated",
        knowledge=[f"Gary is color{i}.", f"Fiona is size{i}."],
        facts=[f"Gary is color{i}."],
        question=f"Gary is color{i}.",
        answer="yes",
        hops=0,
    )
    for i in range(6)
]
RECORDS = [PW, CL, PW_NONE] + OTHER


def corpus_of_all_methods(records):
    texts: list[str] = []
    pool = [k for r in records for k in r["knowledge"]]
    for method in METHODS:
        texts += list(Encoder(None, method, True, 128, fact_pool=pool).corpus(records))
    return texts


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(corpus_of_all_methods(RECORDS))


def tokens(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens([int(i) for i in ids])


def masked(labels: torch.Tensor) -> list[int]:
    return [int(i) for i in labels[labels != IGNORE_INDEX]]


# ------------------------------------------------------------------------------ text formats


def test_prompt_and_target_wording_for_both_families():
    assert reckoning_prompt(PW) == "Based on fact_0 fact_1 fact_2, can we conclude Bob is kind?"
    assert reckoning_prompt(CL) == "Based on fact_0 fact_1, How is Tom related to Jason?"
    assert target_text(PW, multi_task=True) == "yes because Bob is red. If someone is red then they are kind."
    assert target_text(PW, multi_task=False) == "yes"
    assert target_text(CL, multi_task=True) == "son because Jason is the father of Lisa. Tom is the brother of Lisa."
    assert target_text(CL, multi_task=False) == "son"
    # No relevant facts: no dangling "because".
    assert target_text(PW_NONE, multi_task=True) == "none"
    assert in_context_prompt(PW, PW["knowledge"]) == (
        "Bob is red.\nAnne is big.\nIf someone is red then they are kind.\ncan we conclude Bob is kind?"
    )
    assert in_context_prompt(CL, None) == "How is Tom related to Jason?"


def test_knowledge_lines_mask_everything_but_the_fact_and_eos(tok):
    batch = Encoder(tok, "reckoning", multi_task=True, max_length=64).collate([PW])
    k = batch.knowledge
    assert k is not None and k.input_ids.shape == (1, 3, 12)  # "fact_2 : If ... kind . <eos>"
    decoded = ["Bob is red . <eos>", "Anne is big . <eos>", "If someone is red then they are kind . <eos>"]
    for i, fact in enumerate(PW["knowledge"]):
        row_ids, row_labels, row_mask = k.input_ids[0, i], k.labels[0, i], k.attention_mask[0, i]
        n = int(row_mask.sum())
        assert tokens(tok, row_ids[:2]) == [f"fact_{i}", ":"]
        # Loss exactly on the fact tokens and the eos: the "fact_i:" prefix is excluded.
        assert tokens(tok, masked(row_labels)) == tok.tokenize(fact) + ["<eos>"]
        assert tok.decode(masked(row_labels)) == decoded[i]
        assert (row_labels[:2] == IGNORE_INDEX).all()
        assert (row_labels[:n][2:] == row_ids[:n][2:]).all()
        # Right padding: pad id, mask 0, no loss.
        assert (row_ids[n:] == tok.pad_token_id).all() and (row_labels[n:] == IGNORE_INDEX).all()
        assert row_mask[:n].all()


def test_sequence_is_prompt_then_target_with_loss_on_target_and_eos_only(tok):
    batch = Encoder(tok, "reckoning", multi_task=True, max_length=64).collate([PW])
    seq = batch.sequence
    n = int(seq.attention_mask[0].sum())
    assert tok.decode(seq.input_ids[0, :n]) == (
        "Based on fact_0 fact_1 fact_2 , can we conclude Bob is kind ? "
        "yes because Bob is red . If someone is red then they are kind . <eos>"
    )
    assert tok.decode(masked(seq.labels[0])) == "yes because Bob is red . If someone is red then they are kind . <eos>"
    # The loss starts right after the prompt: the prompt tokens equal the generation prompt.
    first = int((seq.labels[0] != IGNORE_INDEX).nonzero()[0])
    assert torch.equal(seq.input_ids[0, :first], batch.prompt.input_ids[0])
    assert (seq.labels[0, first:n] == seq.input_ids[0, first:n]).all()

    single = Encoder(tok, "reckoning", multi_task=False, max_length=64).collate([PW]).sequence
    assert tokens(tok, masked(single.labels[0])) == ["yes", "<eos>"]


def test_padding_left_for_prompts_right_for_sequences_and_pad_facts(tok):
    batch = Encoder(tok, "reckoning", multi_task=False, max_length=64).collate([PW, CL, PW_NONE])
    pad = tok.pad_token_id
    # Prompt lengths: PW 13, CL 12 ("How is Tom related to Jason ?" is 7 tokens), PW_NONE 11.
    lengths = batch.prompt.attention_mask.sum(1).tolist()
    assert lengths == [13, 12, 11]
    p_ids, p_mask = batch.prompt.input_ids, batch.prompt.attention_mask
    assert p_ids.shape == (3, 13)
    assert (p_ids[1, :1] == pad).all() and p_mask[1].tolist() == [0] + [1] * 12
    assert (p_ids[2, :2] == pad).all() and (p_mask[2, :2] == 0).all() and p_mask[2, 2:].all()
    assert tok.decode(p_ids[2, 2:]) == "Based on fact_0 , can we conclude Erin is cold ?"
    # Every prompt ends with its last real token: generation continues at column -1.
    assert tokens(tok, p_ids[:, -1]) == ["?", "?", "?"]

    s_ids, s_mask, s_labels = batch.sequence.input_ids, batch.sequence.attention_mask, batch.sequence.labels
    assert s_ids.shape == (3, 15)  # 13 prompt + answer + eos
    assert s_mask.sum(1).tolist() == [15, 14, 13]
    assert (s_ids[1, 14:] == pad).all() and (s_labels[1, 14:] == IGNORE_INDEX).all()
    assert (s_ids[2, 13:] == pad).all() and (s_labels[2, 13:] == IGNORE_INDEX).all() and (s_mask[2, 13:] == 0).all()
    assert tokens(tok, masked(s_labels[2])) == ["none", "<eos>"]

    # F = 3 (PW); CL has 2 facts and PW_NONE 1: the missing ones are all pad, no loss, no attention.
    k = batch.knowledge
    assert k.input_ids.shape[:2] == (3, 3)
    assert k.attention_mask.sum(2).tolist() == [[7, 7, 12], [10, 10, 0], [7, 0, 0]]
    assert (k.input_ids[1, 2] == pad).all() and (k.labels[1, 2] == IGNORE_INDEX).all()
    assert (k.input_ids[2, 1:] == pad).all() and (k.labels[2, 1:] == IGNORE_INDEX).all()
    assert batch.hops.tolist() == [1, 2, 0] and batch.hops.dtype == torch.long
    assert batch.answers == ["yes", "son", "none"]
    assert batch.facts == [PW["facts"], CL["facts"], []]
    assert batch.ids == ["pw-0", "cl-0", "pw-1"]
    for t in (k.input_ids, k.attention_mask, k.labels, s_ids, s_mask, s_labels, p_ids, p_mask):
        assert t.dtype == torch.long


# ------------------------------------------------------------------------------ in-context methods


def test_icr_prompts_have_no_knowledge_batch(tok):
    icr = Encoder(tok, "icr", multi_task=True, max_length=128).collate([PW])
    assert icr.knowledge is None
    n = int(icr.prompt.attention_mask[0].sum())
    assert n == icr.prompt.input_ids.shape[1]
    assert tok.decode(icr.prompt.input_ids[0]) == (
        "Bob is red . Anne is big . If someone is red then they are kind . can we conclude Bob is kind ?"
    )
    assert tok.decode(masked(icr.sequence.labels[0])) == (
        "yes because Bob is red . If someone is red then they are kind . <eos>"
    )
    no_facts = Encoder(tok, "icr_no_facts", multi_task=False, max_length=128).collate([PW, CL])
    assert no_facts.knowledge is None
    assert tok.decode(no_facts.prompt.input_ids[0][no_facts.prompt.attention_mask[0].bool()]) == "can we conclude Bob is kind ?"
    assert tok.decode(no_facts.prompt.input_ids[1]) == "How is Tom related to Jason ?"


def test_icr_random_facts_come_from_other_tasks_and_are_seeded(tok):
    pool = [k for r in RECORDS for k in r["knowledge"]]
    enc = Encoder(tok, "icr_random_facts", multi_task=True, max_length=128, seed=0, fact_pool=pool)
    drawn = enc.random_facts(PW, pool)
    assert len(drawn) == 3 and len(set(drawn)) == 3
    assert not set(drawn) & set(PW["knowledge"])
    assert set(drawn) <= set(pool)
    assert enc.prompt_text(PW) == "\n".join(drawn) + "\ncan we conclude Bob is kind?"
    # Same seed, same draw (every epoch, every process); another seed, another draw.
    again = Encoder(tok, "icr_random_facts", multi_task=True, max_length=128, seed=0, fact_pool=pool)
    assert again.random_facts(PW, pool) == drawn
    other = Encoder(tok, "icr_random_facts", multi_task=True, max_length=128, seed=1, fact_pool=pool)
    assert other.random_facts(PW, pool) != drawn
    batch = enc.collate([PW, CL])
    assert batch.knowledge is None
    assert tok.decode(batch.prompt.input_ids[0]) == tok.decode(tok(enc.prompt_text(PW))["input_ids"])
    # Without a pool the other tasks of the batch are the pool.
    batch_pool = Encoder(tok, "icr_random_facts", multi_task=True, max_length=128).collate([PW, CL])
    text = tok.decode(batch_pool.prompt.input_ids[0][batch_pool.prompt.attention_mask[0].bool()])
    assert text.count("Lisa") == 3  # both CL sentences + one drawn again (pool of 2 < 3 facts)
    assert "Bob is red" not in text.split("can we conclude")[0]
    with pytest.raises(EncodeError, match="pw-0.*fact_pool"):
        Encoder(tok, "icr_random_facts", multi_task=True, max_length=128).collate([PW])


def test_the_encoder_knows_every_train_method():
    from reckoning_ray.core.schema import AUTO_NODE_TYPE
    from reckoning_ray.core.schema import METHODS as CONFIG_METHODS

    assert METHODS == CONFIG_METHODS and set(AUTO_NODE_TYPE) == set(METHODS)
    assert AUTO_NODE_TYPE["icr_no_question"] == "rtx3090" and AUTO_NODE_TYPE["reckoning_random_facts"] == "a100"


def test_icr_no_question_prompt_is_the_knowledge_without_the_question(tok):
    enc = Encoder(tok, "icr_no_question", multi_task=True, max_length=128)
    assert enc.prompt_text(PW) == "Bob is red.\nAnne is big.\nIf someone is red then they are kind."
    batch = enc.collate([PW, CL])
    assert batch.knowledge is None
    icr = Encoder(tok, "icr", multi_task=True, max_length=128).collate([PW, CL])
    for t, record in enumerate([PW, CL]):
        prompt = tok.decode(batch.prompt.input_ids[t][batch.prompt.attention_mask[t].bool()])
        for fact in record["knowledge"]:
            assert normalize_fact(fact) in normalize_fact(prompt)
        # nothing of the question: not its wording, not FT-ICR's question phrase
        assert normalize_fact(record["question"].rstrip(".?")) not in normalize_fact(prompt)
        assert "conclude" not in prompt and "related" not in prompt and "?" not in prompt
        # the target is FT-ICR's: the answer and, multi-task, the relevant facts
        assert tok.decode(masked(batch.sequence.labels[t])) == tok.decode(masked(icr.sequence.labels[t]))
    assert tok.decode(masked(batch.sequence.labels[0])) == (
        "yes because Bob is red . If someone is red then they are kind . <eos>"
    )
    single = Encoder(tok, "icr_no_question", multi_task=False, max_length=128).collate([PW])
    assert tok.decode(masked(single.sequence.labels[0])) == "yes <eos>"
    with pytest.raises(EncodeError, match="empty-0.*knowledge"):
        enc.collate([dict(PW, id="empty-0", knowledge=[])])


def knowledge_rows(tok, batch, t) -> list[str]:
    """The decoded fact bodies of task ``t``'s knowledge lines (loss-masked tokens, eos dropped)."""
    k = batch.knowledge
    rows = []
    for i in range(k.labels.shape[1]):
        body = masked(k.labels[t, i])
        if body:
            rows.append(tok.decode(body[:-1]))
    return rows


def test_reckoning_random_facts_encodes_knowledge_of_other_tasks(tok):
    pool = [k for r in RECORDS for k in r["knowledge"]]
    enc = Encoder(tok, "reckoning_random_facts", multi_task=True, max_length=128, seed=0, fact_pool=pool)
    drawn = enc.knowledge_of(PW)
    assert drawn == enc.random_facts(PW, pool)
    assert len(drawn) == len(PW["knowledge"]) == 3 and len(set(drawn)) == 3  # same count, no repeats
    assert not set(drawn) & set(PW["knowledge"])  # none of the task's own
    assert set(drawn) <= set(pool)
    batch = enc.collate([PW, CL])
    assert batch.knowledge is not None and batch.knowledge.input_ids.shape[:2] == (2, 3)
    assert [normalize_fact(r) for r in knowledge_rows(tok, batch, 0)] == [normalize_fact(f) for f in drawn]
    assert len(knowledge_rows(tok, batch, 1)) == 2
    assert not {normalize_fact(f) for f in knowledge_rows(tok, batch, 1)} & {normalize_fact(f) for f in CL["knowledge"]}
    # The prompt, the target (own answer and own relevant facts) and the gold facts are RECKONING's.
    own = Encoder(tok, "reckoning", multi_task=True, max_length=128).collate([PW, CL])
    assert torch.equal(batch.sequence.input_ids, own.sequence.input_ids)
    assert torch.equal(batch.sequence.labels, own.sequence.labels)
    assert torch.equal(batch.prompt.input_ids, own.prompt.input_ids)
    assert batch.facts == own.facts == [PW["facts"], CL["facts"]]
    assert knowledge_rows(tok, own, 0) != knowledge_rows(tok, batch, 0)
    # Seeded per task: the same draw in every epoch and process, another seed another draw.
    again = Encoder(tok, "reckoning_random_facts", multi_task=True, max_length=128, seed=0, fact_pool=pool)
    assert again.knowledge_of(PW) == drawn
    assert torch.equal(again.collate([PW, CL]).knowledge.input_ids, batch.knowledge.input_ids)
    assert torch.equal(enc.collate([CL, PW]).knowledge.input_ids[1], batch.knowledge.input_ids[0])
    other = Encoder(tok, "reckoning_random_facts", multi_task=True, max_length=128, seed=1, fact_pool=pool)
    assert other.knowledge_of(PW) != drawn
    # Without a pool the other tasks of the batch are the pool; one task alone has none.
    batch_pool = Encoder(tok, "reckoning_random_facts", multi_task=True, max_length=128).collate([PW, CL])
    rows = knowledge_rows(tok, batch_pool, 0)
    assert len(rows) == 3 and {normalize_fact(r) for r in rows} <= {normalize_fact(f) for f in CL["knowledge"]}
    with pytest.raises(EncodeError, match="pw-0.*fact_pool"):
        Encoder(tok, "reckoning_random_facts", multi_task=True, max_length=128).collate([PW])
    # The pool forces repeats (2 sentences of others for 3 facts), never the task's own sentences.
    small = Encoder(tok, "reckoning_random_facts", True, 128, fact_pool=PW["knowledge"] + CL["knowledge"])
    forced = small.knowledge_of(PW)
    assert len(forced) == 3 and set(forced) <= set(CL["knowledge"])
    with pytest.raises(EncodeError, match="pw-0.*no knowledge of other tasks"):
        Encoder(tok, "reckoning_random_facts", True, 128, fact_pool=PW["knowledge"]).collate([PW])
    with pytest.raises(EncodeError, match="no inner loop"):
        Encoder(tok, "icr", True, 128).knowledge_of(PW)


# ------------------------------------------------------------------------------ parse_generation


@pytest.mark.parametrize(
    "text, label, facts",
    [
        ("Yes because bob is red .", "yes", ["bob is red ."]),
        (" yes because Bob is red. Bob is big.<eos> junk", "yes", ["bob is red .", "bob is big ."]),
        ("no.", "no", []),
        ("None", "none", []),
        ("son - in - law because Jason is the father of Lisa .", "son-in-law", ["jason is the father of lisa ."]),
        ("yes because bob is", "yes", ["bob is"]),
        ("no because\nbob is red .", "no", []),
        ("  \n", "", []),
        ("Because bob is red .", "", ["bob is red ."]),
    ],
)
def test_parse_generation(tok, text, label, facts):
    assert Encoder(tok, "reckoning", True, 64).parse_generation(text) == (label, facts)


def test_normalisation_helpers_agree_across_tokenizer_spacing():
    assert normalize_fact("Bob is red.") == normalize_fact("bob  is red .") == "bob is red ."
    assert normalize_label("Son-in-law.") == normalize_label("son - in - law") == "son-in-law"
    assert split_facts("a b . c d . e") == ["a b .", "c d .", "e"]


# ------------------------------------------------------------------------------ truncation


def test_long_prompts_lose_tokens_on_the_left_and_targets_stay_whole(tok):
    full = Encoder(tok, "icr", multi_task=True, max_length=128).collate([PW])
    full_prompt = full.prompt.input_ids[0].tolist()
    target = masked(full.sequence.labels[0])
    assert len(full_prompt) == 24 and len(target) == 16
    enc = Encoder(tok, "icr", multi_task=True, max_length=21)
    batch = enc.collate([PW])
    assert batch.sequence.input_ids.shape == (1, 21)
    assert masked(batch.sequence.labels[0]) == target
    kept = batch.prompt.input_ids[0].tolist()
    assert kept == full_prompt[-5:]
    assert tok.decode(kept) == "conclude Bob is kind ?"
    assert batch.sequence.input_ids[0, :5].tolist() == kept


def test_target_that_does_not_fit_is_a_clear_error(tok):
    with pytest.raises(EncodeError, match=r"task 'pw-0'.*target \(16 tokens.*model.max_length=16.*outer.multi_task=false"):
        Encoder(tok, "reckoning", multi_task=True, max_length=16).collate([PW])
    # Single-task, the same length is enough (13 prompt + 2 target tokens).
    batch = Encoder(tok, "reckoning", multi_task=False, max_length=16).collate([PW])
    assert batch.sequence.input_ids.shape == (1, 15)


def test_knowledge_line_that_does_not_fit_is_a_clear_error(tok):
    # "fact_2 : If someone is red then they are kind . <eos>" is 12 tokens.
    with pytest.raises(EncodeError, match=r"task 'pw-0': knowledge\[2\].*12 tokens.*model.max_length=11"):
        Encoder(tok, "reckoning", multi_task=False, max_length=11).collate([PW])


def test_bad_inputs_are_clear_errors(tok):
    with pytest.raises(EncodeError, match="train.method='maml'"):
        Encoder(tok, "maml", True, 64)
    empty = make_record(id="e-0", family="proofwriter", source="generated", knowledge=[], facts=[],
                        question="Bob is red.", answer="none", hops=0)
    with pytest.raises(EncodeError, match="task 'e-0'.*'knowledge' is empty"):
        Encoder(tok, "reckoning", True, 64).collate([empty])
    # In-context methods accept a task without knowledge.
    assert Encoder(tok, "icr", True, 64).collate([empty]).prompt.input_ids.shape == (1, 7)

    class NoPad:
        pad_token_id = None
        eos_token_id = 1

    with pytest.raises(EncodeError, match="pad.*eos.*pad = eos"):
        Encoder(NoPad(), "reckoning", True, 64)
    # A text-only encoder (tokenizer=None) gives texts and parses, but does not collate.
    text_only = Encoder(None, "reckoning", True, 64)
    assert text_only.parse_generation("yes because bob is red .") == ("yes", ["bob is red ."])
    with pytest.raises(EncodeError, match="no tokenizer"):
        text_only.collate([PW])
    with pytest.raises(EncodeError, match="no records"):
        Encoder(tok, "reckoning", True, 64).collate([])


# ------------------------------------------------------------------------------ batch plumbing


def test_select_to_and_dataloader(tok):
    enc = Encoder(tok, "reckoning", multi_task=True, max_length=64)
    batch = enc.collate([PW, CL, PW_NONE])
    sub = batch.select([2, 0])
    assert len(sub) == 2 and sub.ids == ["pw-1", "pw-0"] and sub.answers == ["none", "yes"]
    assert torch.equal(sub.knowledge.input_ids, batch.knowledge.input_ids[[2, 0]])
    assert torch.equal(sub.sequence.labels, batch.sequence.labels[[2, 0]])
    assert torch.equal(sub.prompt.attention_mask, batch.prompt.attention_mask[[2, 0]])
    assert sub.hops.tolist() == [0, 1]
    with pytest.raises(IndexError):
        batch.select([3])
    moved = batch.to("meta")
    assert moved.sequence.input_ids.device.type == "meta" and moved.knowledge.labels.device.type == "meta"
    assert moved.sequence.input_ids.shape == batch.sequence.input_ids.shape

    # A second pass (token ids from the encoder's cache) gives the same tensors.
    again = enc.collate([PW, CL, PW_NONE])
    for a, b in [(again.knowledge.input_ids, batch.knowledge.input_ids), (again.knowledge.labels, batch.knowledge.labels),
                 (again.sequence.input_ids, batch.sequence.input_ids), (again.sequence.labels, batch.sequence.labels),
                 (again.prompt.input_ids, batch.prompt.input_ids)]:
        assert torch.equal(a, b)

    loader = DataLoader(RECORDS, batch_size=4, shuffle=False, collate_fn=enc.collate)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 1]
    assert all(isinstance(b, TaskBatch) for b in batches)


@pytest.mark.parametrize("method", METHODS)
def test_corpus_covers_every_token_the_encoder_emits(method):
    pool = [k for r in RECORDS for k in r["knowledge"]]
    texts = list(Encoder(None, method, True, 128, fact_pool=pool).corpus(RECORDS))
    tok = build_tokenizer(texts)
    for multi_task in (True, False):
        batch = Encoder(tok, method, multi_task, 128, fact_pool=pool).collate(RECORDS)
        tensors = [batch.sequence.input_ids, batch.prompt.input_ids]
        if batch.knowledge is not None:
            tensors.append(batch.knowledge.input_ids)
        for t in tensors:
            assert (t != tok.unk_token_id).all()


def test_byte_level_bpe_masks_fall_on_piece_boundaries():
    """GPT-2-style tokenizers put the space inside the next token (" Bob"); pieces keep it."""
    texts = list(Encoder(None, "reckoning", True, 128).corpus(RECORDS))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    batch = Encoder(tok, "reckoning", multi_task=True, max_length=128).collate([PW, CL])
    k = batch.knowledge
    assert tok.decode(masked(k.labels[0, 0])) == " Bob is red.<|endoftext|>"
    assert tok.decode(k.input_ids[0, 2][k.attention_mask[0, 2].bool()]) == "fact_2: If someone is red then they are kind.<|endoftext|>"
    seq = batch.sequence
    assert tok.decode(seq.input_ids[1][seq.attention_mask[1].bool()]) == (
        "Based on fact_0 fact_1, How is Tom related to Jason? son because Jason is the father of Lisa. "
        "Tom is the brother of Lisa.<|endoftext|>"
    )
    assert tok.decode(masked(seq.labels[1])) == (
        " son because Jason is the father of Lisa. Tom is the brother of Lisa.<|endoftext|>"
    )
    # Piecewise ids equal whole-string ids: the mask does not change the tokenisation.
    whole = tok("Based on fact_0 fact_1, How is Tom related to Jason? son because Jason is the father of Lisa. "
                "Tom is the brother of Lisa.")["input_ids"] + [tok.eos_token_id]
    assert seq.input_ids[1][seq.attention_mask[1].bool()].tolist() == whole
