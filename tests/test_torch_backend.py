"""The torch backend's own decode loop against transformers' `generate`, on a tiny random Llama."""
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.backends.torch_backend import TorchBackend
from engine.backends.torch_sampling import penalize, sample
from engine.config.run_config import TorchConfig
from engine.types import Request, SamplingParams


def make_requests(tok, n, max_new, prefix_len=12):
    prefix = list(range(5, 5 + prefix_len))
    reqs = []
    for i in range(n):
        doc = tok(f"the cat {'sat on a mat ' * (1 + i % 4)} water {i}", add_special_tokens=False).input_ids
        reqs.append(Request(i, "p", prefix + doc, prefix_len, max_new + (i % 3) * 5))
    return reqs


def reference(model_dir, reqs):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for r in reqs:
        ids = model.generate(torch.tensor([r.input_ids]), max_new_tokens=r.max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        out[r.key] = ids[0, len(r.input_ids):].tolist()
    return out


def run_backend(model_dir, reqs, sampling=None, **kw):
    b = TorchBackend(str(model_dir), sampling or SamplingParams(0.0, 1.0, 0), eos_ids=set(), pad_id=0,
                     settings=TorchConfig(**kw), dtype="float32")
    b.start()
    got = {}
    for done in b.generate(iter(reqs), threading.Event()):
        for c in done:
            got[c.key] = c
    return got


@pytest.mark.parametrize("batch_size,prefix_cache,refill",
                         [(4, True, 0.5), (4, False, 0.5), (3, True, 1.0), (1, True, 0.5)])
def test_matches_generate_token_for_token(tiny_model, batch_size, prefix_cache, refill):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reqs = make_requests(tok, 7, 8)
    ref = reference(tiny_model, reqs)
    got = run_backend(tiny_model, reqs, batch_size=batch_size, prefix_cache=prefix_cache, refill_fraction=refill)
    assert set(got) == set(ref)
    for k, c in got.items():
        assert c.output_ids == ref[k], f"request {k}"
        assert c.finish_reason == "length" and c.completion_tokens == len(ref[k])
    # the prefix is computed once (for its first request) and served from the cache to the 6 others
    assert sorted(c.cached_tokens for c in got.values()) == ([0] + [12] * 6 if prefix_cache else [0] * 7)


def document_first_requests(tok, docs, suffixes):
    """Requests laid out as render.layout = "document_first" renders them: header + document (shared by every
    prompt of the document: prefix_len covers it) + the prompt's instruction, document-major."""
    header = list(range(5, 11))
    reqs = []
    for text in docs:
        doc = tok(text, add_special_tokens=False).input_ids
        for p, suffix in enumerate(suffixes):
            reqs.append(Request(len(reqs), f"p{p}", header + doc + suffix, len(header) + len(doc), 6 + p))
    return reqs


@pytest.mark.parametrize("batch_size,prefill_tokens", [(4, 4096), (3, 60), (8, 4096)])
def test_document_prefixes_are_computed_once_and_match_generate(tiny_model, batch_size, prefill_tokens):
    """Several documents x 3 prompts: each document's prefix (of its own length) is computed once and copied
    into the rows of its prompts, whatever the batch splits; the tokens are generate's."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    docs = ["the cat sat on a mat " * (1 + d % 3) + f"water {d}" for d in range(5)]
    reqs = document_first_requests(tok, docs, [[40, 41, 42], [43, 44], [45, 46, 47, 48]])
    ref = reference(tiny_model, reqs)
    got = run_backend(tiny_model, reqs, batch_size=batch_size, prefill_tokens=prefill_tokens)
    assert {k: c.output_ids for k, c in got.items()} == ref
    for d in range(len(docs)):
        mine = [got[r.key].cached_tokens for r in reqs[3 * d: 3 * d + 3]]
        assert sorted(mine) == [0, reqs[3 * d].prefix_len, reqs[3 * d].prefix_len], (d, mine)


def test_prefix_cache_keeps_within_its_memory(tiny_model):
    """A budget too small for any prefix: nothing is kept, every prefix is computed where it is needed, and
    the output is unchanged."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reqs = document_first_requests(tok, ["one two three " * 4, "four five six " * 5], [[40, 41], [42]])
    ref = reference(tiny_model, reqs)
    got = run_backend(tiny_model, reqs, batch_size=2, prefix_cache_mb=0)
    assert {k: c.output_ids for k, c in got.items()} == ref
    from engine.backends.torch_kv import PrefixCache
    cache = PrefixCache(1)
    kv = lambda n: [(torch.zeros(1, 2, n, 64), torch.zeros(1, 2, n, 64))]  # noqa: E731 - 1 KiB a token
    cache.put((1,), kv(600))
    cache.put((2,), kv(300))
    assert cache.get((1,)) is not None  # (1,) is now the most recently used
    cache.put((3,), kv(300))  # over 1 MiB: the least recently used, (2,), goes
    assert [k for k in cache.entries] == [(1,), (3,)] and cache.bytes == 900 * 1024
    cache.put((4,), kv(1100))  # larger than the whole budget: not kept
    assert cache.get((4,)) is None and cache.bytes == 900 * 1024


def test_a_cache_of_one_document_still_serves_every_row_of_an_admission(tiny_model):
    """A cache that holds one document's prefix; batches of 3, 2 prompts a document, rows ending together:
    the second admission (B1, C0, C1) finds B cached, then computes C's, which drops B from the cache; B1 still
    gets B's KV, and the tokens are generate's."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reqs = document_first_requests(tok, ["one two three " * 6, "four five six " * 6, "seven eight " * 9],
                                   [[40, 41], [42]])
    for r in reqs:
        r.max_new_tokens = 5
    ref = reference(tiny_model, reqs)
    b = TorchBackend(str(tiny_model), SamplingParams(0.0, 1.0, 0), eos_ids=set(), pad_id=0,
                     settings=TorchConfig(batch_size=3), dtype="float32")
    b.start()
    cfg = b.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    b._prefix_kv.budget = per_token * max(r.prefix_len for r in reqs)  # room for one document
    got = {c.key: c for done in b.generate(iter(reqs), threading.Event()) for c in done}
    b.close()
    assert {k: c.output_ids for k, c in got.items()} == ref
    assert len(b._prefix_kv.entries) == 0  # closed


def test_a_seeded_row_samples_the_same_tokens_whatever_its_batch(tiny_model):
    """sampling.seed set: each row draws from its own generator (request_seed), so batch size, refills and
    the order of the other rows do not change what it samples; unset, one generator serves the batch."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reqs = make_requests(tok, 7, 12)
    seeded = SamplingParams(1.0, 0.9, 7)
    alone = run_backend(tiny_model, reqs, seeded, batch_size=1)
    for kw in ({"batch_size": 4}, {"batch_size": 3, "refill_fraction": 1.0}):
        got = run_backend(tiny_model, reqs, seeded, **kw)
        assert {k: c.output_ids for k, c in got.items()} == {k: c.output_ids for k, c in alone.items()}, kw
    shuffled = run_backend(tiny_model, reqs[::-1], seeded, batch_size=4)
    assert {k: c.output_ids for k, c in shuffled.items()} == {k: c.output_ids for k, c in alone.items()}
    other = run_backend(tiny_model, reqs, SamplingParams(1.0, 0.9, 8), batch_size=1)
    assert {k: c.output_ids for k, c in other.items()} != {k: c.output_ids for k, c in alone.items()}
    shared = [run_backend(tiny_model, reqs, SamplingParams(1.0, 0.9, None), batch_size=n) for n in (1, 4)]
    assert {k: c.output_ids for k, c in shared[0].items()} != {k: c.output_ids for k, c in shared[1].items()}


def test_eos_stops_a_row_and_is_not_returned(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reqs = make_requests(tok, 6, 20)
    ref = reference(tiny_model, reqs)
    # A request whose output has a token that appears only after its start: make that token the EOS.
    k, i = next((k, j) for k, seq in ref.items() for j in range(1, len(seq)) if seq[j] not in seq[:j])
    seq = ref[k]
    eos = seq[i]
    b = TorchBackend(str(tiny_model), SamplingParams(0.0, 1.0, 0), eos_ids={eos}, pad_id=0, dtype="float32")
    b.start()
    got = {c.key: c for done in b.generate(iter(reqs), threading.Event()) for c in done}
    assert got[k].finish_reason == "stop" and got[k].output_ids == seq[:i] and got[k].completion_tokens == i + 1


def test_ignore_eos_runs_every_row_to_max_new_tokens(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reqs = make_requests(tok, 6, 20)
    ref = reference(tiny_model, reqs)
    eos = {seq[1] for seq in ref.values()}  # every row would stop at its second token
    b = TorchBackend(str(tiny_model), SamplingParams(0.0, 1.0, 0, ignore_eos=True), eos_ids=eos, pad_id=0,
                     dtype="float32")
    b.start()
    got = {c.key: c for done in b.generate(iter(reqs), threading.Event()) for c in done}
    for r in reqs:
        assert got[r.key].finish_reason == "length" and got[r.key].output_ids == ref[r.key]


def test_stop_event_ends_generation_without_yielding_unfinished(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    reqs = make_requests(tok, 20, 30)
    b = TorchBackend(str(tiny_model), SamplingParams(0.0, 1.0, 0), eos_ids=set(), pad_id=0,
                     settings=TorchConfig(batch_size=4))
    b.start()
    stop = threading.Event()
    seen = []
    for done in b.generate(iter(reqs), stop):
        seen += done
        stop.set()
    assert 0 < len(seen) < 20


def test_nucleus_sampling_keeps_only_the_top_mass():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 400]) + 1e-12)
    picks = {int(sample(logits, SamplingParams(1.0, 0.7, None), g)) for _ in range(300)}
    assert picks == {0, 1}
    flat = torch.zeros((2, 1000))  # a nucleus wider than the top-k shortcut
    assert len({int(t) for _ in range(50) for t in sample(flat, SamplingParams(1.0, 0.9, None), g)}) > 20
    assert sample(torch.tensor([[0.1, 3.0, 0.2]]), SamplingParams(0.0, 0.9, None), g).tolist() == [1]


def test_top_k_min_p_and_repetition_penalty_as_transformers_applies_them():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04] + [0.0] * 400]) + 1e-12)
    def draw(s, n=400):
        return {int(sample(logits, s, g)) for _ in range(n)}

    assert draw(SamplingParams(1.0, 1.0, None, top_k=2)) == {0, 1}
    # top-p within the renormalised top 3 (0.4/0.9, 0.3/0.9 reach 0.7): two tokens, not three
    assert draw(SamplingParams(1.0, 0.7, None, top_k=3)) == {0, 1}
    # min-p 0.4: tokens with at least 0.4 x 0.4 = 0.16 probability
    assert draw(SamplingParams(1.0, 1.0, None, min_p=0.4)) == {0, 1, 2}
    flat = torch.zeros((1, 1000))  # min-p alone over the whole vocabulary: every token stays
    assert len({int(sample(flat, SamplingParams(1.0, 1.0, None, min_p=0.5), g)) for _ in range(50)}) > 20
    # Repetition penalty: a seen token's positive logit is divided, a negative one multiplied.
    rep = SamplingParams(0.0, 1.0, None, repetition_penalty=2.0)
    pos = torch.tensor([[3.0, 2.0, -1.0], [3.0, 2.0, -1.0]])
    assert sample(pos, rep, g, [[0], [1, 1]]).tolist() == [1, 0]  # 3/2 < 2; row 2: 2/2 < 3
    assert penalize(torch.tensor([[3.0, 2.0, -1.0]]), [[2]], 2.0).tolist() == [[3.0, 2.0, -2.0]]
    from transformers import RepetitionPenaltyLogitsProcessor
    scores = torch.randn(2, 50)
    hist = [[1, 5, 5, 7], [3]]
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([hist[0], [3, 3, 3, 3]]), scores.clone())
    assert torch.allclose(penalize(scores, hist, 1.3), theirs)
