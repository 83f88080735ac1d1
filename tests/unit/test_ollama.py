"""The Modelfile's chat template (Ollama's Go template) renders a multi-turn conversation with a system
message to the same text as the tokenizer's own (Jinja) chat template."""

import pytest

LLAMA3_JINJA = (  # Meta-Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "You are Maya's assistant. Answer in one sentence."},
    {"role": "user", "content": "When does the reef tank light come on?"},
    {"role": "assistant", "content": "At 10:00, ramping up over an hour."},
    {"role": "user", "content": "And the refugium?"},
    {"role": "assistant", "content": "On the reverse cycle, 20:00 to 08:00."},
    {"role": "user", "content": "Thanks! Anything else to check?"},
]


def _tiny():
    from transformers import AutoTokenizer

    from training import models

    return AutoTokenizer.from_pretrained(models.tiny_folder())


def _llama3():
    from transformers import PreTrainedTokenizerFast

    tok = _tiny()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", chat_template=LLAMA3_JINJA)
    fast.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    return fast


@pytest.mark.parametrize("which,family", [("tiny", "chatml"), ("smollm2", "chatml"), ("llama3", "llama3")])
def test_the_modelfile_template_renders_like_the_tokenizer(which, family):
    from transformers import AutoTokenizer

    from training import models

    from training.export import ollama

    tok = {"tiny": _tiny, "llama3": _llama3,
           "smollm2": lambda: AutoTokenizer.from_pretrained(models.resolve("smollm2"))}[which]()
    assert ollama.identify(tok)[0] == family
    want = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    got = ollama.render(ollama.FAMILIES[family][0], CONVERSATION)
    if tok.bos_token and want == tok.bos_token + got:
        want = want[len(tok.bos_token):]  # BOS is the runtime's (llama.cpp adds it), not the template's
    assert got == want
    text, info = ollama.modelfile("m.gguf", tok, system=None, num_ctx=2048)
    assert f'TEMPLATE """{ollama.FAMILIES[family][0]}"""' in text
    assert all(f'PARAMETER stop "{s}"' in text for s in ollama.FAMILIES[family][1])


def test_a_template_of_fixed_text_around_each_turn_is_derived_and_one_that_is_not_is_left_to_the_gguf():
    from transformers import PreTrainedTokenizerFast

    from training.export import ollama

    tok = _tiny()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>",
                                      chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                                    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    family, why, template = ollama.identify(wrapped)
    assert family == "derived" and template
    for conv in ollama.PROBES + [CONVERSATION]:
        assert ollama.render(template, conv) == wrapped.apply_chat_template(conv, tokenize=False,
                                                                            add_generation_prompt=True)
    numbered = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>",
                                       chat_template="{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n"
                                                     "{% endfor %}")
    family, why, template = ollama.identify(numbered)
    assert family is None and template is None and "no known family" in why
    text, info = ollama.modelfile("m.gguf", numbered, system="Be kind.", num_ctx=4096)
    assert "TEMPLATE" not in text and 'SYSTEM """Be kind."""' in text and "num_ctx 4096" in text


def test_the_go_template_subset_renders_as_gos_text_template():
    """The constructs the family templates use, rendered by duet's subset and, where Go is installed, by
    Go's text/template itself (Ollama's engine): the Modelfile's SYSTEM becomes the first message."""
    from training.export import ollama

    t = ('{{- $sys := "" }}{{- range .Messages }}{{ if eq .Role "system" }}{{ $sys = .Content }}{{ end }}{{ end }}'
         '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}U{{ $i }}:{{ if and $sys (eq (len (slice $.Messages $i)) 1) }}'
         '[{{ $sys }}]{{ end }}{{ $m.Content }}{{ else if eq $m.Role "assistant" }}A:{{ $m.Content }}{{ else }}S{{ end }}\n'
         '{{- end }}|{{ $.System }}|{{ "lit\\n" }}{{ if or (ne 1 2) false }}or{{ end }}{{ if not true }}no{{ end }}')
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    want = "SU1:aA:bU3:[Sys]c|Sys|lit\nor"
    assert ollama.render(t, msgs, system="Sys") == want
    go = ollama.go_render(t, [msgs], "Sys")
    if go is not None:
        assert go == [want]
