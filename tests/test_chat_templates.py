"""Prompts and label masks from each LLM's own published chat template (Qwen2.5, Qwen3, Llama 3.1).

For every family: the rendered ids of a multi-turn, two-image conversation equal `apply_chat_template`'s with the
placeholder runs in place; the labels equal a layout written out here by hand, token by token; generation prompts
equal the template's own; the placeholder is an existing special token with an embedding row (a documented
resize only where the tokenizer has none).
"""

import copy

import pytest
import torch
from accelerate import init_empty_weights
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from minigpt4qwen.checkpoint.export import chat_stop_token_ids
from minigpt4qwen.checkpoint.llm import placeholder_token_id, prepare_placeholder
from minigpt4qwen.model.configs import minigpt4qwen_config
from minigpt4qwen.model.minigpt4qwen import MiniGPT4Qwen
from minigpt4qwen.text.conversation import IGNORE_INDEX, IMAGE_MARKER, end_of_turn_token_id, render_with_template
from tests.llm_families import (
    NAMES,
    family_tokenizer,
    published_config,
    published_ids_tokenizer,
    published_tokenizer_config,
    tiny_config,
)

Q = 3  # placeholder tokens per image
SYSTEM = "You are a helpful assistant."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "<Img><ImageHere></Img> and <Img><ImageHere></Img>: what differs?"},
    {"role": "assistant", "content": "The left one is red; 右边是蓝色的。"},
    {"role": "user", "content": "Which is bigger?"},
    {"role": "assistant", "content": "The second."},
]
PLACEHOLDER = {"Qwen2.5-7B-Instruct": "<|image_pad|>", "Qwen2.5-14B-Instruct": "<|image_pad|>",
               "Qwen3-8B": "<|image_pad|>", "Llama-3.1-8B-Instruct": "<|reserved_special_token_0|>"}
LLAMA_SYSTEM_HEADER = "\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    tokenizer = family_tokenizer(request.param)
    return request.param, tokenizer, placeholder_token_id(tokenizer)


def with_placeholders(messages, token: str):
    return [dict(m, content=m["content"].replace(IMAGE_MARKER, token * Q)) for m in messages]


def hand_layout(name: str, messages) -> list[tuple[str, str, bool]]:
    """The family's layout written out: (kind, text, supervised) with kind special | text | content."""
    pieces = []
    if name.startswith("Llama"):
        system, rest = messages[0]["content"], messages[1:]
        pieces += [("special", "<|begin_of_text|>", False), ("special", "<|start_header_id|>", False),
                   ("text", "system", False), ("special", "<|end_header_id|>", False),
                   ("text", LLAMA_SYSTEM_HEADER + system, False), ("special", "<|eot_id|>", False)]
        for m in rest:
            reply = m["role"] == "assistant"
            pieces += [("special", "<|start_header_id|>", False), ("text", m["role"], False),
                       ("special", "<|end_header_id|>", False), ("text", "\n\n", False),
                       ("content", m["content"].strip(), reply), ("special", "<|eot_id|>", reply)]
        return pieces
    for i, m in enumerate(messages):
        reply = m["role"] == "assistant"
        header = m["role"] + "\n"
        if name.startswith("Qwen3") and reply and i == len(messages) - 1:  # the last reply gets an empty think
            header += "<think>\n\n</think>\n\n"
        pieces += [("special", "<|im_start|>", False), ("text", header, False), ("content", m["content"], reply),
                   ("special", "<|im_end|>", reply), ("text", "\n", False)]
    return pieces


def encode_layout(tokenizer, pieces, image_id: int) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for kind, text, supervised in pieces:
        if kind == "special":
            new = [tokenizer.convert_tokens_to_ids(text)]
        else:
            new = []
            for k, part in enumerate(text.split(IMAGE_MARKER)):
                new += ([image_id] * Q if k else []) + tokenizer(part, add_special_tokens=False).input_ids
        ids += new
        labels += [t if supervised and t != image_id else IGNORE_INDEX for t in new]
    return ids, labels


def test_prompt_equals_apply_chat_template_with_placeholders_in_place(family):
    name, tokenizer, image_id = family
    out = render_with_template(tokenizer, CONVERSATION, image_token_id=image_id, num_query_tokens=Q)
    filled = with_placeholders(CONVERSATION, PLACEHOLDER[name])
    assert out.input_ids == tokenizer.apply_chat_template(filled, tokenize=True)["input_ids"]
    assert tokenizer.decode(out.input_ids) == tokenizer.apply_chat_template(filled, tokenize=False)
    assert out.num_images == 2 and [out.input_ids[s:e] for s, e in out.image_spans] == [[image_id] * Q] * 2
    assert out.input_ids.count(image_id) == 2 * Q


def test_labels_token_by_token(family):
    name, tokenizer, image_id = family
    out = render_with_template(tokenizer, CONVERSATION, image_token_id=image_id, num_query_tokens=Q)
    ids, labels = encode_layout(tokenizer, hand_layout(name, CONVERSATION), image_id)
    assert out.input_ids == ids
    for k, (got, want) in enumerate(zip(out.labels, labels, strict=True)):
        assert got == want, f"{name} token {k} {tokenizer.convert_ids_to_tokens(ids[k])!r}: label {got} != {want}"
    end_of_turn = "<|eot_id|>" if name.startswith("Llama") else "<|im_end|>"
    supervised = [t for t in out.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == f"The left one is red; 右边是蓝色的。{end_of_turn}The second.{end_of_turn}"


def test_generation_prompt_is_the_templates(family):
    name, tokenizer, image_id = family
    prompt = CONVERSATION[:-1]
    out = render_with_template(tokenizer, prompt, image_token_id=image_id, num_query_tokens=Q,
                               add_generation_prompt=True)
    # Qwen3 trains replies after an empty think block, which is its non-thinking generation prompt.
    extra = {"enable_thinking": False} if name.startswith("Qwen3") else {}
    expected = tokenizer.apply_chat_template(with_placeholders(prompt, PLACEHOLDER[name]), tokenize=True,
                                             add_generation_prompt=True, **extra)["input_ids"]
    assert out.input_ids == expected
    full = render_with_template(tokenizer, CONVERSATION, image_token_id=image_id, num_query_tokens=Q)
    assert full.input_ids[: len(out.input_ids)] == out.input_ids  # the reply is learned right where it starts


def test_typed_control_tokens_stay_text(family):
    name, tokenizer, image_id = family
    typed = "".join(t["content"] for t in published_tokenizer_config(name)["added_tokens_decoder"].values()
                    if t["special"])[:400]
    messages = [{"role": "user", "content": f"{typed}<ImageHere>{typed}"}, {"role": "assistant", "content": typed}]
    out = render_with_template(tokenizer, messages, image_token_id=image_id, num_query_tokens=Q)
    assert out.input_ids.count(image_id) == Q
    plain = render_with_template(tokenizer, [{"role": "user", "content": "x<ImageHere>x"},
                                             {"role": "assistant", "content": "x"}],
                                 image_token_id=image_id, num_query_tokens=Q)
    specials = set(tokenizer.all_special_ids)
    assert [t for t in out.input_ids if t in specials] == [t for t in plain.input_ids if t in specials]


@pytest.mark.parametrize("name", NAMES)
def test_placeholder_is_a_reserved_special_token_with_a_row_at_full_size(name):
    tokenizer, config = published_ids_tokenizer(name), published_config(name)
    size = len(tokenizer)
    with init_empty_weights():
        llm = AutoModelForCausalLM.from_config(config)
    image_id = prepare_placeholder(llm, tokenizer)
    assert tokenizer.convert_ids_to_tokens(image_id) == PLACEHOLDER[name]
    assert image_id == {"<|image_pad|>": 151655, "<|reserved_special_token_0|>": 128002}[PLACEHOLDER[name]]
    assert len(tokenizer) == size and llm.get_input_embeddings().num_embeddings == config.vocab_size  # no resize
    assert image_id not in tokenizer(PLACEHOLDER[name], split_special_tokens=True).input_ids
    composite = minigpt4qwen_config(llm.config, image_token_id=image_id, num_query_tokens=32)
    with init_empty_weights():
        model = MiniGPT4Qwen(composite, language_model=llm)
    assert model.language_projection.out_features == config.hidden_size
    assert composite.image_token_id == image_id


def _chatml_without_reserved_tokens() -> PreTrainedTokenizerFast:
    """Qwen2-like: ChatML template, only <|endoftext|>, <|im_start|>, <|im_end|> special; no spare row."""
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    template = published_tokenizer_config("Qwen2.5-7B-Instruct")["chat_template"]
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def test_a_tokenizer_without_reserved_tokens_gets_image_and_a_resized_embedding():
    tokenizer = _chatml_without_reserved_tokens()
    rows = len(tokenizer)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(tiny_config("Qwen2.5-7B-Instruct", rows, tokenizer)).eval()
    old_in, old_out = llm.get_input_embeddings().weight.clone(), llm.get_output_embeddings().weight.clone()
    image_id = prepare_placeholder(llm, tokenizer)
    assert tokenizer.convert_ids_to_tokens(image_id) == "<image>" and image_id == rows
    assert llm.get_input_embeddings().num_embeddings == llm.config.vocab_size == rows + 1
    assert llm.get_output_embeddings().weight.shape[0] == rows + 1
    assert torch.equal(llm.get_input_embeddings().weight[:rows], old_in)
    assert torch.equal(llm.get_output_embeddings().weight[:rows], old_out)
    assert prepare_placeholder(llm, tokenizer) == image_id and llm.config.vocab_size == rows + 1  # once only
    assert image_id not in tokenizer("<image>", split_special_tokens=True).input_ids
    # The composite model runs with the grown LLM: image features land on the placeholder rows.
    from minigpt4qwen.model.configs import tiny_qformer_config, tiny_vision_config

    config = minigpt4qwen_config(llm.config, image_token_id=image_id, vision_config=tiny_vision_config(),
                                 qformer_config=tiny_qformer_config(), num_query_tokens=Q)
    model = MiniGPT4Qwen(config, language_model=llm).eval()
    out = render_with_template(tokenizer, CONVERSATION[:2], image_token_id=image_id, num_query_tokens=Q,
                               add_generation_prompt=True)
    ids = torch.tensor([out.input_ids])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), pixel_values=torch.randn(2, 3, 28, 28)).logits
    assert logits.shape == (1, ids.shape[1], rows + 1) and torch.isfinite(logits).all()


def test_an_explicit_placeholder_must_be_special():
    tokenizer = family_tokenizer("Llama-3.1-8B-Instruct")
    assert placeholder_token_id(tokenizer, "<|reserved_special_token_9|>") == tokenizer.convert_tokens_to_ids(
        "<|reserved_special_token_9|>")
    with pytest.raises(ValueError, match="not a special token"):
        placeholder_token_id(family_tokenizer("Qwen3-8B"), "<think>")


def test_whitespace_the_template_trims_is_trimmed_in_the_labels_too():
    tokenizer = family_tokenizer("Llama-3.1-8B-Instruct")  # its template writes `content | trim`
    image_id = placeholder_token_id(tokenizer)
    messages = [{"role": "user", "content": " <ImageHere> What is it?\n"},
                {"role": "assistant", "content": " A cat.\n\n"}]
    out = render_with_template(tokenizer, messages, image_token_id=image_id, num_query_tokens=Q)
    filled = with_placeholders(messages, "<|reserved_special_token_0|>")
    assert out.input_ids == tokenizer.apply_chat_template(filled, tokenize=True)["input_ids"]
    assert tokenizer.decode([t for t in out.labels if t != IGNORE_INDEX]) == "A cat.<|eot_id|>"


def test_generation_blocks_decide_the_labels_where_the_template_has_them():
    tokenizer = copy.copy(family_tokenizer("Qwen2.5-7B-Instruct"))
    # Marks the reply, its <|im_end|> and the newline after it: unlike the default rule, "\n" is learned too.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    image_id = placeholder_token_id(tokenizer)
    out = render_with_template(tokenizer, CONVERSATION, image_token_id=image_id, num_query_tokens=Q)
    supervised = tokenizer.decode([t for t in out.labels if t != IGNORE_INDEX])
    assert supervised == "The left one is red; 右边是蓝色的。<|im_end|>\nThe second.<|im_end|>\n"
    masked = tokenizer.apply_chat_template(with_placeholders(CONVERSATION, "<|image_pad|>"), tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)
    assert out.input_ids == masked["input_ids"]
    assert [label != IGNORE_INDEX for label in out.labels] == [bool(m) for m in masked["assistant_masks"]]


@pytest.mark.parametrize("name", NAMES)
def test_replies_stop_at_the_templates_end_of_turn_token(name):
    tokenizer = family_tokenizer(name)
    expected = "<|eot_id|>" if name.startswith("Llama") else "<|im_end|>"
    assert end_of_turn_token_id(tokenizer) == tokenizer.convert_tokens_to_ids(expected)
    assert tokenizer.convert_tokens_to_ids(expected) in chat_stop_token_ids(tokenizer)


def test_a_changed_template_and_a_new_special_token_are_seen_after_a_render(family):
    """The frames and control tokens are cached per tokenizer: a new template or vocabulary must not be missed."""
    name, tokenizer, image_id = family
    tokenizer = copy.deepcopy(tokenizer)
    render_with_template(tokenizer, CONVERSATION, image_token_id=image_id, num_query_tokens=Q)  # fills the caches
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new_control|>"]})
    tokenizer.chat_template = "<|new_control|>" + tokenizer.get_chat_template()
    out = render_with_template(tokenizer, CONVERSATION, image_token_id=image_id, num_query_tokens=Q)
    filled = with_placeholders(CONVERSATION, PLACEHOLDER[name])
    assert out.input_ids == tokenizer.apply_chat_template(filled, tokenize=True)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|new_control|>") in out.input_ids


PLAIN_TEMPLATE = ("{% for m in messages %}[{{ m.role }}]{% if m.reasoning_content %}({{ m.reasoning_content }})"
                  "{% endif %}{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def test_cached_frames_follow_what_else_the_template_reads(family):
    """Frames are cached per template and messages less contents; a template that reads another key of a message,
    or special tokens that changed since, still renders what `apply_chat_template` renders."""
    name, tokenizer, image_id = family
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = PLAIN_TEMPLATE
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    thinking = [plain[0], {**plain[1], "reasoning_content": "think first"}]
    for messages in (plain, thinking, plain):
        out = render_with_template(tokenizer, messages, image_token_id=image_id, num_query_tokens=Q)
        assert tokenizer.decode(out.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    tokenizer.chat_template = "{{ bos_token }}" + PLAIN_TEMPLATE
    render_with_template(tokenizer, plain, image_token_id=image_id, num_query_tokens=Q)
    tokenizer.add_special_tokens({"bos_token": "<|new_bos|>"})  # the cached frames now begin with the old one
    out = render_with_template(tokenizer, plain, image_token_id=image_id, num_query_tokens=Q)
    assert tokenizer.decode(out.input_ids) == tokenizer.apply_chat_template(plain, tokenize=False)
    assert out.input_ids[0] == tokenizer.convert_tokens_to_ids("<|new_bos|>")


def test_frames_cache_is_bounded(family):
    from minigpt4qwen.text import chat_template

    name, tokenizer, image_id = family
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = PLAIN_TEMPLATE
    for turns in range(1, 2 * chat_template.FRAMES_PER_TOKENIZER):
        messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": "x"} for k in range(turns)]
        render_with_template(tokenizer, messages, image_token_id=image_id, num_query_tokens=Q)
    assert len(chat_template._FRAMES[tokenizer]) == chat_template.FRAMES_PER_TOKENIZER
