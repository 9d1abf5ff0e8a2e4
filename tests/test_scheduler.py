"""The generation scheduler: every request gets the answer it gets alone (greedy, and sampled with a seed),
whatever else is decoded with it, whenever others join, leave, are cancelled or fail.

"Exactly": batched float32 matmuls on the CPU may differ from batch-1 ones in the last bit, so the greedy
references also check that every chosen token beats the runner-up by far more than such rounding (teacher-forced
through the plain model), and the answers are compared as token ids.
"""

import asyncio
import functools
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers.masking_utils
from PIL import Image

from minigpt4qwen.inference.decoding import readback, slot_decoder, slot_rounds
from minigpt4qwen.inference.decoding.cuda_graphs import host_syncs
from minigpt4qwen.inference.decoding.generation_handle import GenerationHandle, _Pieces
from minigpt4qwen.inference.decoding.job import Job
from minigpt4qwen.inference.decoding.scheduler import GenerationScheduler
from minigpt4qwen.inference.decoding.slot_decoder import SlotDecoder
from minigpt4qwen.inference.decoding.slot_rounds import SlotRounds
from minigpt4qwen.inference.decoding.token_choice import RowChooser
from minigpt4qwen.inference.engine import IMAGE_PROMPT, GenerationCancelled
from minigpt4qwen.inference.frontends.openai_api.openai_protocol import Conversation, PromptSpec
from minigpt4qwen.inference.generation import GenerationSettings, StopTrimmer, trim_at_stop
from minigpt4qwen.text.qwen_tokenizer import build_qwen1_tokenizer
from tests.conftest import make_tiny_chat_model

MARGIN = 1e-5  # batched vs batch-1 float32 rounding of these logits is ~1e-6


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)


@pytest.fixture(scope="module")
def scheduler(model_and_tokenizer):
    # Small prefill budget: prompts share prefill forwards and the long one is prefilled in chunks.
    scheduler = GenerationScheduler(*model_and_tokenizer, slots=8, capacity=192, check_every=4, prefill_tokens=128,
                                    rehearse_captures=True)
    yield scheduler
    scheduler.close()


def _prompt(model_and_tokenizer, text, *colours, history=()):
    model, tokenizer = model_and_tokenizer
    images = [Image.new("RGB", (40, 40), colour) for colour in colours]
    conversation = Conversation(query=IMAGE_PROMPT * len(images) + text, query_images=images, turns=list(history),
                                turn_images=[[] for _ in history])
    ids, pixels = conversation.prompt(PromptSpec.of(model), tokenizer)
    return {"input_ids": ids, "pixel_values": pixels}


def _requests(mt):
    """Different prompts, images and settings (one prompt longer than a prefill forward takes)."""
    long_history = [("what colour is the shape " * 6, "red green blue circle square " * 5)]
    return [
        (_prompt(mt, "what colour is the shape", "red"), GenerationSettings(max_new_tokens=20)),
        (_prompt(mt, "what is the shape", "blue", "green"),
         GenerationSettings(max_new_tokens=16, repetition_penalty=1.3)),
        (_prompt(mt, "red green blue"), GenerationSettings(max_new_tokens=20, do_sample=True, temperature=0.8,
                                                          top_p=0.9, seed=1)),
        (_prompt(mt, "图 中 的 形 状 是 什 么", "white"), GenerationSettings(max_new_tokens=12, do_sample=True,
                                                                   temperature=1.3, top_k=5, seed=2)),
        (_prompt(mt, "square circle", (9, 200, 30)), GenerationSettings(max_new_tokens=24, stop=("circle",))),
        (_prompt(mt, "what colour", "black", history=long_history), GenerationSettings(max_new_tokens=10)),
    ]


def _alone(scheduler, requests):
    out = []
    for prompt, settings in requests:
        handle = scheduler.submit(**prompt, settings=settings)
        out.append((handle.result(30), handle.token_ids))
    return out


def _greedy_margin(model, prompt, tokens):
    """The smallest lead of each chosen token over the runner-up, teacher-forced through the plain model; also
    checks that each chosen token is the model's argmax."""
    with torch.no_grad():  # the reply as embeddings: the tiny model may answer with the placeholder id
        features = model.encode_images(prompt["pixel_values"]) if prompt["pixel_values"] is not None else None
        embeds = torch.cat([model.embed(prompt["input_ids"], features),
                            model.language_model.get_input_embeddings()(torch.tensor([tokens]))], dim=1)
        logits = model.language_model(inputs_embeds=embeds).logits[0, prompt["input_ids"].shape[1] - 1 : -1]
    top = logits.topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == tokens
    return float((top.values[:, 0] - top.values[:, 1]).min())


@pytest.fixture(scope="module")
def alone(scheduler, model_and_tokenizer):
    requests = _requests(model_and_tokenizer)
    answers = _alone(scheduler, requests)
    texts = [text for text, _ in answers]
    assert len(set(texts)) == len(texts) and all(texts), texts  # distinct, checkable answers
    assert any("circle" not in text for text in texts) and "circle" not in texts[4]
    for i in (0, 4, 5):  # plain greedy: the model's own argmax, by a margin rounding cannot close
        assert _greedy_margin(model_and_tokenizer[0], requests[i][0], answers[i][1]) > MARGIN
    return requests, answers


def test_concurrent_requests_get_their_alone_answers(scheduler, alone):
    requests, expected = alone
    with scheduler.model_lock:  # all admitted in one round: encoded, prefilled and decoded together
        handles = [scheduler.submit(**prompt, settings=settings) for prompt, settings in requests]
        time.sleep(0.05)
        assert all(handle.num_tokens == 0 for handle in handles)  # the loop is held
    for handle, (text, tokens) in zip(handles, expected, strict=True):
        assert handle.result(30) == text and handle.token_ids == tokens
    others = [text for text, _ in expected]
    for handle in handles:  # no answer carries another request's text
        assert [t for t in others if len(t) > 8 and t in handle.result() and t != handle.result()] == []
    assert scheduler.stats()["active_slots"] == 0 and scheduler.stats()["completed"] >= 2 * len(requests)


def test_warm_up_prepares_every_decode_step_and_changes_no_answer(model_and_tokenizer, alone):
    # Before serving, every (bucket, span, sampling) decode step is captured (rehearsed here): 4 buckets up to 8
    # slots, spans 64 / 128 / 192 of a 192-token slot, greedy and sampled. The captures' warm-ups run real steps:
    # the answers afterwards are the ones requests get without a warm-up.
    requests, expected = alone
    scheduler = GenerationScheduler(*model_and_tokenizer, slots=8, capacity=192, check_every=4, prefill_tokens=128,
                                    rehearse_captures=True)
    try:
        reports = []
        assert scheduler.warm_up() == 4 * 3 * 2
        assert sorted(key[1:] for key in scheduler.decoder._graphs) == sorted(
            (bucket, span, sample) for bucket in (1, 2, 4, 8) for span in (64, 128, 192) for sample in (False, True))
        scheduler.decoder.warm_up(lambda done, total: reports.append((done, total)))  # already prepared: cheap
        assert reports[-1] == (24, 24) and len(reports) == 24
        handles = [scheduler.submit(**prompt, settings=settings) for prompt, settings in requests]
        for handle, (text, tokens) in zip(handles, expected, strict=True):
            assert handle.result(30) == text and handle.token_ids == tokens
    finally:
        scheduler.close()
    eager = GenerationScheduler(*model_and_tokenizer, slots=2, capacity=128)  # on the CPU: nothing to prepare
    try:
        assert eager.warm_up() == 0 and eager.decoder._graphs == {}
    finally:
        eager.close()


class _Gate:
    """Holds the scheduler before each decode chunk until the test lets a number of them through."""

    def __init__(self, decode):
        self.decode, self.cond, self.permits, self.arrived = decode, threading.Condition(), 0, 0

    def __call__(self, *args, **kwargs):
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.permits > 0, timeout=30)
            self.permits -= 1
        return self.decode(*args, **kwargs)

    def run(self, chunks):
        """Lets `chunks` decode chunks run; returns when the loop waits before the next one."""
        with self.cond:
            target = self.arrived + chunks
            self.permits += chunks
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.arrived >= max(target, 1), timeout=30)

    def open(self):
        with self.cond:
            self.permits += 10**6
            self.cond.notify_all()


def test_joins_leaves_cancels_and_failures_change_nothing_for_the_others(scheduler, alone, model_and_tokenizer,
                                                                          monkeypatch):
    requests, expected = alone
    gate = _Gate(scheduler.decoder.launch_decode)
    monkeypatch.setattr(scheduler.decoder, "launch_decode", gate)
    submit = functools.partial(scheduler.submit)
    first = [submit(**requests[i][0], settings=requests[i][1]) for i in (0, 2)]
    gate.run(0)
    gate.run(2)  # 8 tokens in
    assert all(0 < h.num_tokens < h.settings.max_new_tokens for h in first)
    joined = [submit(**requests[i][0], settings=requests[i][1]) for i in (1, 3, 5)]
    doomed = submit(**requests[4][0], settings=requests[4][1])
    broken = submit(requests[0][0]["input_ids"], settings=GenerationSettings(max_new_tokens=5))  # no images
    for _ in range(4):  # one prefill forward per round: the long prompt takes two, then the doomed one starts
        if doomed.num_tokens == 0:
            gate.run(1)
    assert 0 < doomed.num_tokens and not doomed.done and sum(not h.done for h in [*first, *joined]) >= 3
    doomed.cancel()
    gate.run(1)
    assert doomed.done and scheduler.stats()["active_slots"] == sum(not h.done for h in [*first, *joined]) > 0
    gate.open()
    for handle, i in zip([*first, *joined], (0, 2, 1, 3, 5), strict=True):
        assert handle.result(30) == expected[i][0] and handle.token_ids == expected[i][1]
    with pytest.raises(GenerationCancelled) as cancelled:
        doomed.result()
    assert expected[4][1][: doomed.num_tokens] == doomed.token_ids and cancelled.value.partial is not None
    with pytest.raises(ValueError, match="placeholder"):
        broken.result(30)


def test_a_bad_image_or_a_failing_prefill_fails_only_its_request(scheduler, alone, monkeypatch):
    requests, expected = alone
    prefill = scheduler.decoder.launch_prefill
    lengths = {n for prompt, _ in requests for n in (prompt["input_ids"].shape[1], prompt["input_ids"].shape[1] - 128)}
    doomed_length = min(set(range(20, 60)) - lengths)  # no other prompt or chunk has its length

    def flaky_prefill(chunks, sample):  # "out of memory" whenever the doomed prompt is in the forward
        if any(len(chunk.embeds) == doomed_length for chunk in chunks):
            raise RuntimeError("CUDA out of memory (simulated)")
        return prefill(chunks, sample)

    encode = scheduler.decoder.encode_images

    def fussy_encode(pixels):  # an image the vision tower chokes on: all NaN
        if pixels.isnan().all(dim=(1, 2, 3)).any():
            raise RuntimeError("cannot encode a NaN image (simulated)")
        return encode(pixels)

    monkeypatch.setattr(scheduler.decoder, "launch_prefill", flaky_prefill)
    monkeypatch.setattr(scheduler.decoder, "encode_images", fussy_encode)
    doomed_ids = requests[2][0]["input_ids"][:, :doomed_length]
    with scheduler.model_lock:  # one round: the failures happen inside shared batches
        bad_image = scheduler.submit(requests[0][0]["input_ids"], pixel_values=torch.full((1, 3, 28, 28), torch.nan))
        doomed = scheduler.submit(doomed_ids)
        good = [scheduler.submit(**prompt, settings=settings) for prompt, settings in requests]
    for handle, (text, tokens) in zip(good, expected, strict=True):
        assert handle.result(30) == text and handle.token_ids == tokens
    with pytest.raises(RuntimeError, match="out of memory"):
        doomed.result(30)
    with pytest.raises(RuntimeError, match="NaN image"):
        bad_image.result(30)
    with pytest.raises(ValueError, match=r"\[N, 3, 28, 28\]"):
        scheduler.submit(requests[0][0]["input_ids"], pixel_values=torch.zeros(1, 3, 20, 20))
    assert scheduler.stats()["active_slots"] == 0


def test_streams_lengths_and_capacity(scheduler, alone, model_and_tokenizer):
    requests, expected = alone
    prompt, settings = requests[0]
    pieces = list(scheduler.submit(**prompt, settings=settings))
    assert len(pieces) > 1 and "".join(pieces) == expected[0][0]

    async def consume():
        return [piece async for piece in scheduler.submit(**requests[4][0], settings=requests[4][1])]

    assert "".join(asyncio.run(consume())) == expected[4][0]
    short = scheduler.submit(**prompt, settings=GenerationSettings(max_new_tokens=3))
    assert short.result(30) is not None and short.finish_reason == "length" and short.token_ids == expected[0][1][:3]
    assert scheduler.submit(**requests[4][0], settings=requests[4][1]).wait(30)
    # a reply runs until the slot is full: capacity - prompt tokens
    long = scheduler.submit(**prompt, settings=GenerationSettings(max_new_tokens=1000))
    long.result(30)
    assert long.finish_reason == "length" and long.num_tokens == scheduler.capacity - long.prompt_tokens
    with pytest.raises(ValueError, match="does not fit"):
        scheduler.submit(torch.ones(1, scheduler.capacity, dtype=torch.long))
    with pytest.raises(ValueError, match="beam"):
        scheduler.submit(**prompt, settings=GenerationSettings(num_beams=2))


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(scheduler, alone, model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    requests, expected = alone
    prompt, tokens = requests[0][0], expected[0][1]
    # The first token whose text is new to the reply: a stop string that token (and no earlier one) completes.
    for last in range(2, len(tokens)):
        stop = tokenizer.decode(tokens[last - 1 : last]).strip()
        if stop and stop not in tokenizer.decode(tokens[: last - 1]):
            break
    handle = scheduler.submit(**prompt, settings=GenerationSettings(max_new_tokens=last, stop=(stop,)))
    handle.result(30)
    assert handle.token_ids == tokens[:last] and handle.finish_reason == "stop"  # not "length"


def _warped_probs(logits, temperature, top_k, top_p):
    """transformers' own warpers: the distribution `generate(do_sample=True)` draws from."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits[None].float()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(None, scores)
    return scores.softmax(-1)[0]


def test_streamed_pieces_decode_incrementally_to_the_whole_reply():
    """Random Qwen ids (Chinese byte fragments split characters across tokens) fed in chunks of 1 to 9: the pieces
    concatenate to the whole reply's text, and decoding stays linear in the reply's length."""
    tokenizer = build_qwen1_tokenizer(Path(__file__).parent / "data" / "qwen7b" / "qwen.tiktoken")
    decoded = [0]
    decode = tokenizer.decode

    class Counting:
        def decode(self, ids, **kwargs):
            decoded[0] += len(ids)
            return decode(ids, **kwargs)

    generator = torch.Generator().manual_seed(0)
    held_back = 0
    for _ in range(20):
        ids = torch.randint(0, 151643, (200,), generator=generator).tolist()
        pieces, fed, out = _Pieces(Counting(), ()), 0, []
        decoded[0] = 0
        while fed < len(ids):
            fed = min(len(ids), fed + int(torch.randint(1, 10, (), generator=generator)))
            out.append(pieces.feed(ids[:fed], final=fed == len(ids)))
            held_back += out[-1] == ""
        assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert decoded[0] <= 8 * len(ids)  # whole-reply decoding each time would be ~20x the length here
    assert held_back  # some chunks ended inside a character (or in blanks) and waited
    # A U+FFFD that is text (Qwen's token 5691), not a character cut short, is held back a bounded while only.
    pieces, ids = _Pieces(tokenizer, ()), [5691] * 40
    assert any(pieces.feed(ids[:n], final=False) for n in range(1, 40))


@pytest.mark.parametrize("pieces, stops", [
    (["a", " ", "b"], ("a b", " ")),  # the longer stop began first and completes after the shorter one is seen
    (["x", "a", " ", "c"], ("a b", " ")),  # it does not complete: the cut is at the shorter one
    (["Hel", "lo <|e", "nd|> more"], ("<|end|>",)),
    (["  lead", "ing ", " ", "trail  "], ()),
])
def test_stop_trimmer_streams_what_trim_at_stop_cuts(pieces, stops):
    trimmer = StopTrimmer(stops)
    out = [trimmer.feed(piece) for piece in pieces] + [trimmer.feed("", final=True)]
    assert "".join(out) == trim_at_stop("".join(pieces), stops).strip()


def test_a_stop_string_is_seen_when_its_character_comes_as_byte_tokens_and_specials_sit_between():
    from minigpt4qwen.inference.generation import StopOnText

    tokenizer = build_qwen1_tokenizer(Path(__file__).parent / "data" / "qwen7b" / "qwen.tiktoken")
    stop = StopOnText(tokenizer, ("中",))
    as_bytes = [160, 116, 255]  # the three UTF-8 bytes of 中, one token each
    assert tokenizer.decode(as_bytes) == "中"
    for ids in (as_bytes, [15946], [160, 116, 151646, 151646, 255], [11, 12, *as_bytes]):
        assert bool(stop(torch.tensor([ids]), None)[0]), ids
    assert not bool(stop(torch.tensor([[11, 12, 13]]), None)[0])


def test_a_tokenizer_that_rewrites_earlier_text_still_gets_the_reply_s_tail():
    """Byte fallback (Llama 2 style) turns a byte run into U+FFFDs once it proves invalid, rewriting text handed out
    earlier: the pieces keep coming and end with the whole reply's tail."""

    class Rewriting:
        texts = {1: "Hello", 2: "Hello\n", 3: "Hello\ufffd\ufffd", 4: "Hello\ufffd\ufffd world"}

        def decode(self, ids, **kwargs):
            return self.texts[len(ids)] if ids and ids[0] == 0 else "".join(
                self.texts[i + 1][len(self.texts[i]) if i else 0:] for i in ids)

    pieces = _Pieces(Rewriting(), ())
    out = [pieces.feed(list(range(n)), final=n == 4) for n in (1, 2, 3, 4)]
    assert out[0] == "Hello" and "".join(out).endswith(" world")


def test_row_chooser_draws_from_transformers_distribution_per_row_and_independently():
    vocab, draws = 40, 3000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 2
    settings = [(0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 8, 0.8)]
    chooser = RowChooser(4, vocab, torch.device("cpu"))
    for row, (temperature, top_k, top_p) in enumerate(settings):
        chooser.configure(row, sample=True, seed=row, temperature=temperature, top_p=top_p, top_k=top_k)
    rows, commit = torch.arange(3), torch.ones(3, dtype=torch.bool)
    drawn = torch.cat([chooser(logits, rows, True, commit) for _ in range(draws)], dim=1)  # [3, draws]
    for row, (temperature, top_k, top_p) in enumerate(settings):
        expected = _warped_probs(logits[row], temperature, top_k or vocab, top_p) * draws
        counts = torch.bincount(drawn[row], minlength=vocab).float()
        assert counts[expected == 0].sum() == 0  # nothing outside top-k / top-p
        kept = expected >= 5
        chi2, dof = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum()), int(kept.sum()) - 1
        assert chi2 < dof + 6 * (2 * dof) ** 0.5, (row, chi2, dof)
    # row 1 alone, in another slot, replays the same draws: they depend on (seed, count), not on the batch
    chooser.configure(3, sample=True, seed=1, temperature=1.3, top_p=0.6)
    alone = torch.cat([chooser(logits[1:2], torch.tensor([3]), True, commit[:1]) for _ in range(50)], dim=1)
    assert torch.equal(alone[0], drawn[1, :50])


def test_top_k_keeps_the_tokens_tied_with_the_k_th_as_transformers_does():
    from transformers import TopKLogitsWarper

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5]])  # two tokens tie for the top: top_k=1 keeps both
    expected = TopKLogitsWarper(1)(None, logits.clone()).softmax(-1)[0]
    assert expected.tolist() == [0.0, 0.5, 0.5, 0.0]
    chooser = RowChooser(1, 4, torch.device("cpu"))
    chooser.configure(0, sample=True, seed=0, temperature=1.0, top_p=1.0, top_k=1)
    rows, commit = torch.arange(1), torch.ones(1, dtype=torch.bool)
    counts = torch.bincount(torch.cat([chooser(logits, rows, True, commit) for _ in range(400)], dim=1)[0],
                            minlength=4)
    assert counts[0] == counts[3] == 0 and min(counts[1], counts[2]) > 150


def test_an_empty_image_batch_is_no_image(scheduler, alone, model_and_tokenizer):
    requests, expected = alone
    prompt, settings = requests[2]  # a text-only prompt
    assert prompt["pixel_values"] is None
    empty = torch.zeros(0, 3, 28, 28)  # as some callers send "no images"
    handle = scheduler.submit(prompt["input_ids"], pixel_values=empty, settings=settings)
    assert handle.result(30) == expected[2][0]


def _job(model_and_tokenizer, text, colour, max_new, order=0):
    _, tokenizer = model_and_tokenizer
    prompt = _prompt(model_and_tokenizer, text, colour)
    ids = prompt["input_ids"].reshape(-1)
    handle = GenerationHandle(tokenizer, GenerationSettings(max_new_tokens=max_new), len(ids), on_cancel=lambda: None)
    return Job(order, handle, ids, prompt["pixel_values"], None, seed=0, max_new=max_new, stop=None)


def test_a_round_queues_its_chunk_before_handing_out_the_previous_one(model_and_tokenizer, alone):
    # The device stays one chunk ahead of the host: the tokens of a round's own steps are handed out next round.
    # The round that admits the request queues a short chunk (ADMISSION_STEPS = 3 here), the next ones check_every.
    model, _ = model_and_tokenizer
    rounds = SlotRounds(model, SlotDecoder(model, slots=4, capacity=128, check_every=4), stop_ids=set())
    job = _job(model_and_tokenizer, "what colour is the shape", "red", max_new=10)
    handed, issued = [], []
    for newcomers in ([job], [], [], []):
        rounds.run(newcomers)
        handed.append(job.handle.num_tokens)
        issued.append(job.issued)
    assert slot_rounds.ADMISSION_STEPS == 3
    assert handed == [1, 4, 8, 10] and issued == [4, 8, 10, 10] and job.handle.done and not rounds.busy
    assert job.handle.token_ids == alone[1][0][1][:10]  # requests[0] alone, greedy


def test_the_next_round_starts_two_steps_before_the_chunk_in_flight_ends(model_and_tokenizer, monkeypatch):
    # A newcomer's prefill is queued behind what the device still has to run when its round starts: the round waits
    # for a mark LEAD_STEPS before the end of the chunk in flight, not for nothing (a whole chunk ahead) or its end.
    model, _ = model_and_tokenizer
    decoder = SlotDecoder(model, slots=4, capacity=128, check_every=4)
    rounds = SlotRounds(model, decoder, stop_ids=set())
    marks, waits, make = [], [], readback.DeviceMark.__init__

    def spy_mark(self, device):
        make(self, device)
        marks.append(int(decoder.ring_index))  # steps of the chunk queued before the mark
        self.steps_before = marks[-1]

    monkeypatch.setattr(readback.DeviceMark, "__init__", spy_mark)
    monkeypatch.setattr(readback.DeviceMark, "wait", lambda self: waits.append(self.steps_before))
    rounds.run([_job(model_and_tokenizer, "what colour is the shape", "red", max_new=10)])
    marks.clear()
    waits.clear()
    rounds.wait_for_device()
    # the admitting round's chunk of 3 steps: its mark after 1 (LEAD_STEPS before its end)
    assert waits == [1] and rounds.in_flight.tokens.nearly.steps_before == 1
    rounds.run([])
    assert marks == [2, 0]  # the new chunk's `nearly` mark after 2 of its 4 steps, then its tokens' after all 4


def test_submit_is_not_held_up_while_the_chunk_in_flight_is_handed_out_for_a_lock_holder(model_and_tokenizer,
                                                                                             monkeypatch):
    # Taking `model_lock` (beam search) makes the loop hand out the chunk in flight, which waits for the device:
    # that wait must not hold the scheduler's condition, or every `submit` and `cancel` waits for it too.
    scheduler = GenerationScheduler(*model_and_tokenizer, slots=2, capacity=128, check_every=4)
    draining, release = threading.Event(), threading.Event()
    drain = scheduler.rounds.drain

    def slow_drain():
        draining.set()
        release.wait(30)
        drain()

    monkeypatch.setattr(scheduler.rounds, "drain", slow_drain)
    prompt = _prompt(model_and_tokenizer, "what colour is the shape", "red")
    try:
        first = scheduler.submit(**prompt, settings=GenerationSettings(max_new_tokens=40))
        locker = threading.Thread(target=scheduler.model_lock.__enter__, daemon=True)
        locker.start()
        assert draining.wait(30)
        started = time.perf_counter()
        second = scheduler.submit(**prompt, settings=GenerationSettings(max_new_tokens=4))
        first.cancel()
        assert time.perf_counter() - started < 1.0 and not second.done
        release.set()
        locker.join(30)
        scheduler.model_lock.__exit__(None, None, None)
        assert second.result(30) and first.wait(30)
    finally:
        release.set()
        scheduler.close()


def test_a_request_ending_while_the_next_chunk_runs_leaves_the_moved_one_intact(model_and_tokenizer, alone):
    # The short request ends when its tokens are read, with the next chunk already queued over both rows; the long
    # one then moves into its slot (behind that chunk) and must still get the tokens it gets alone.
    model, _ = model_and_tokenizer
    rounds = SlotRounds(model, SlotDecoder(model, slots=4, capacity=128, check_every=4), stop_ids=set())
    short = _job(model_and_tokenizer, "square circle red", "red", max_new=3)
    long = _job(model_and_tokenizer, "what colour is the shape", "red", max_new=14, order=1)
    rounds.run([short, long])
    assert (short.slot, long.slot) == (0, 1)
    rounds.run([])  # queues chunk 2 over both rows, then reads chunk 1: the short one is done, the long one moves
    assert short.handle.finish_reason == "length" and short.handle.num_tokens == 3
    assert long.slot == 0 and rounds.in_flight.jobs == [short, long] and rounds.in_flight.rows == [0, 1]
    while rounds.busy:
        rounds.run([])
    assert long.handle.token_ids == alone[1][0][1][:14]


def test_a_failed_capture_of_a_newcomer_s_prefill_leaves_the_others_decoding(model_and_tokenizer, alone,
                                                                             monkeypatch):
    # Capturing a graph zeroes the slots' state for its warm-ups; an out-of-memory capture must put it back.
    model, _ = model_and_tokenizer
    decoder = SlotDecoder(model, slots=4, capacity=128, check_every=4)
    rounds = SlotRounds(model, decoder, stop_ids=set())
    first = _job(model_and_tokenizer, "what colour is the shape", "red", max_new=14)
    rounds.run([first])
    rounds.run([])
    capture = slot_decoder.maybe_captured

    def out_of_memory(step, *args, **kwargs):
        if step.func.__name__ == "_prefill_step":
            raise RuntimeError("CUDA out of memory (simulated capture)")
        return capture(step, *args, **kwargs)

    monkeypatch.setattr(slot_decoder, "maybe_captured", out_of_memory)
    decoder._graphs = {key: graph for key, graph in decoder._graphs.items() if key[0] != "prefill"}
    newcomer = _job(model_and_tokenizer, "what is it", "blue", max_new=5, order=1)
    rounds.run([newcomer])
    monkeypatch.setattr(slot_decoder, "maybe_captured", capture)
    while rounds.busy:
        rounds.run([])
    assert newcomer.handle.finish_reason == "error" and "simulated capture" in str(newcomer.handle.error)
    assert first.handle.token_ids == alone[1][0][1][:14]


def test_a_prefill_retried_alone_goes_to_the_slot_its_request_moved_to(model_and_tokenizer, alone):
    # A shared prefill fails, then the culprit alone: its slot is freed and the last request moves into it before
    # its own chunk is retried, which must then be written to the new slot.
    model, _ = model_and_tokenizer
    decoder = SlotDecoder(model, slots=4, capacity=128, check_every=4)
    rounds = SlotRounds(model, decoder, stop_ids=set())
    doomed = _job(model_and_tokenizer, "what is it", "blue", max_new=5)
    good = _job(model_and_tokenizer, "what colour is the shape", "red", max_new=12, order=1)
    assert len(doomed.input_ids) != len(good.input_ids)
    launch = decoder.launch_prefill

    def out_of_memory(chunks, sample):
        if len(chunks) > 1 or len(chunks[0].embeds) == len(doomed.input_ids):
            raise RuntimeError("CUDA out of memory (simulated)")
        return launch(chunks, sample)

    decoder.launch_prefill = out_of_memory
    rounds.run([doomed, good])
    assert doomed.handle.finish_reason == "error" and good.slot == 0
    while rounds.busy:
        rounds.run([])
    assert good.handle.token_ids == alone[1][0][1][:12]


def test_step_functions_never_synchronise_with_the_host(scheduler, monkeypatch):
    # Under a capture transformers sees a capturing stream and skips its eager-only shortcuts; mimic that here.
    tracing_module = sys.modules[transformers.masking_utils.is_tracing.__module__]
    monkeypatch.setattr(tracing_module, "is_cuda_stream_capturing", lambda: True)
    decoder = scheduler.decoder
    for sample in (False, True):
        assert host_syncs(functools.partial(decoder._prefill_step, 2, 64, 64, sample)) == []
        assert host_syncs(functools.partial(decoder._decode_step, 4, 128, sample)) == []


def assert_graphs_give_the_eager_answers(model, tokenizer, compile_mode=None, warm_up=False) -> None:
    """`_requests` through a CUDA-graph scheduler (its decode step compiled in `compile_mode`; every decode step
    captured up front with `warm_up`, as the CLI does), twice (captures, then replays), equal the eager
    scheduler's."""
    requests = _requests((model, tokenizer))
    eager = GenerationScheduler(model, tokenizer, slots=8, capacity=192, check_every=4, prefill_tokens=128,
                                cuda_graphs=False)
    graphs = GenerationScheduler(model, tokenizer, slots=8, capacity=192, check_every=4, prefill_tokens=128,
                                 compile_mode=compile_mode)
    try:
        if warm_up:
            assert graphs.warm_up() == 4 * 3 * 2  # buckets 1-8, spans 64 / 128 / 192, greedy and sampled
        expected = [handle.result(60) for handle in [eager.submit(**p, settings=s) for p, s in requests]]
        for _ in range(2):
            assert [h.result(60) for h in [graphs.submit(**p, settings=s) for p, s in requests]] == expected
    finally:
        eager.close()
        graphs.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_answers():
    model, tokenizer = make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)
    assert_graphs_give_the_eager_answers(model.cuda(), tokenizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_of_a_compiled_decode_step_give_the_eager_answers():
    model, tokenizer = make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)
    assert_graphs_give_the_eager_answers(model.cuda(), tokenizer, compile_mode="default", warm_up=True)


def test_a_compiled_decode_step_gives_the_answers_alone(model_and_tokenizer, alone):
    # One compile serves every batch size but 1 and every span (they are symbolic): these requests use several.
    requests, expected = alone
    compiled = GenerationScheduler(*model_and_tokenizer, slots=8, capacity=192, check_every=4, prefill_tokens=128,
                                   compile_mode="default")
    try:
        handles = [compiled.submit(**prompt, settings=settings) for prompt, settings in requests]
        assert [handle.result(300) for handle in handles] == [text for text, _ in expected]
        assert compiled.submit(**requests[0][0], settings=requests[0][1]).result(300) == expected[0][0]
    finally:
        compiled.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("graph_prefill_tokens", [512, 0])
def test_after_its_captures_the_loop_waits_for_the_gpu_only_to_read_tokens(graph_prefill_tokens):
    # The device stays a chunk ahead only if nothing in a round blocks on it (a copy from pageable memory, an
    # `.item()`, a synchronize): torch's sync debug mode turns each of those into an error in the loop's thread.
    # Large prefills run eagerly, through transformers' own code: 0 makes every prefill eager.
    model, tokenizer = make_tiny_chat_model(seed=0, image_std=0.2, redraw_biases=True)
    requests = _requests((model.cuda(), tokenizer))
    scheduler = GenerationScheduler(model, tokenizer, slots=8, capacity=192, check_every=4, prefill_tokens=128)
    scheduler.decoder.graph_prefill_tokens = graph_prefill_tokens

    def all_at_once():
        with scheduler.model_lock:  # admitted in one round, as the first time: the same graphs
            handles = [scheduler.submit(**prompt, settings=settings) for prompt, settings in requests]
        return [handle.result(60) for handle in handles]

    try:
        expected = all_at_once()  # captures the graphs these requests need
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert all_at_once() == expected
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        scheduler.close()
