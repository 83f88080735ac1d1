"""Tiny random models of the families users train, each with its family's real config keys and chat
template, and a tokenizer of its family's kind trained offline on the persona examples.

- ``qwen3``: Qwen3 (explicit head_dim != hidden/heads, q/k norms, tied embeddings), byte-level BPE
  with Qwen's split regex, Qwen3's template (think handling, no default system);
- ``qwen2.5``: Qwen2.5 (q/k/v biases, a config vocabulary padded past the tokenizer's), Qwen2.5's
  template (a default system prompt);
- ``llama3.2``: Llama 3.2 (rope scaling ``llama3``, tied embeddings, GQA), byte-level BPE with Llama
  3's regex and BOS from the post-processor, Llama 3.2's template (dated system header);
- ``mistral``: Mistral-7B-v0.3's shape, a SentencePiece BPE vocabulary with byte fallback
  (tokenizer.model), Mistral v0.3's [INST] template;
- ``gemma2``: Gemma 2 (attention and final logit soft-capping, sliding window, query_pre_attn_scalar,
  tied embeddings), SentencePiece with <start_of_turn>, Gemma's template (no system role);
- ``gemma3``: Gemma 3 text (q/k norms, local/global layers with their own rope bases), Gemma 3's
  template (the system folded into the first user turn);
- ``phi4-mini``: Phi-4-mini (fused qkv_proj and gate_up_proj, partial rotary, longrope scaling),
  byte-level BPE with GPT-4o's regex, Phi-4-mini's template;
- ``phi3.5``: Phi-3.5-mini (fused projections, longrope, a SentencePiece vocabulary), its template.

Built once per cache dir (``build(name)`` -> the folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

QWEN3_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n    {{- \"# Tools\\n\\n\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"<|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}\n        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {%- set content = message.content %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}")

QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\n\" }}\n    {{- \"<|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")

LLAMA32_TEMPLATE = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    "{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n"
    "{#- System message #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{%- if tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {{- message.content }}\n"
    "        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n")

MISTRAL_V03_TEMPLATE = (
    "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n"
    "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n"
    "    {%- if not (message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is defined "
    "and message.tool_calls is not none)) %}\n"
    "        {%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}\n"
    "            {{- raise_exception(\"After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n        {{- \" \" + message[\"content\"]|trim + eos_token}}\n"
    "    {%- else %}\n        {{- raise_exception(\"Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!\") }}\n    {%- endif %}\n{%- endfor %}\n")

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# Gemma 3's template: the one duet gives the real Gemma 3 270M (training/models.py)
from training.models import GEMMA3_CHAT_TEMPLATE as GEMMA3_TEMPLATE  # noqa: E402

PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is "
    "not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' "
    "+ '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
               r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}

FAMILIES = {
    "qwen3": {"kind": "bpe", "regex": QWEN_REGEX, "template": QWEN3_TEMPLATE, "class": "Qwen3",
              "tokenizer_class": "Qwen2Tokenizer",
              "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
              "eos": "<|im_end|>", "pad": "<|endoftext|>",
              "config": {**SMALL, "head_dim": 32, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                         "max_position_embeddings": 40960, "rms_norm_eps": 1e-6}},
    "qwen2.5": {"kind": "bpe", "regex": QWEN_REGEX, "template": QWEN25_TEMPLATE, "class": "Qwen2",
                "tokenizer_class": "Qwen2Tokenizer",
                "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>",
                "pad": "<|endoftext|>", "vocab_pad": 64,
                "config": {**SMALL, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}},
    "llama3.2": {"kind": "bpe", "regex": LLAMA3_REGEX, "template": LLAMA32_TEMPLATE, "class": "Llama",
                 "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>", "<|finetune_right_pad_id|>"],
                 "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>",
                 "config": {**SMALL, "head_dim": 16, "tie_word_embeddings": True, "max_position_embeddings": 131072,
                            "rms_norm_eps": 1e-5,
                            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                            "rope_theta": 500000.0}},
    "mistral": {"kind": "spm", "template": MISTRAL_V03_TEMPLATE, "class": "Mistral", "tokenizer_class": "LlamaTokenizer",
                "legacy": True, "specials": ["[INST]", "[/INST]"], "bos": "<s>", "eos": "</s>", "unk": "<unk>", "dummy_prefix": True,
                "config": {**SMALL, "head_dim": 16, "rope_theta": 1000000.0, "sliding_window": None,
                           "tie_word_embeddings": False, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5}},
    "gemma2": {"kind": "spm", "template": GEMMA2_TEMPLATE, "class": "Gemma2", "tokenizer_class": "GemmaTokenizer",
               "specials": ["<start_of_turn>", "<end_of_turn>"], "bos": "<bos>", "eos": "<eos>", "unk": "<unk>",
               "pad": "<pad>", "dummy_prefix": False,
               "config": {**SMALL, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32,
                          "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                          "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
                          "tie_word_embeddings": True, "rms_norm_eps": 1e-6}},
    "gemma3": {"kind": "spm", "template": GEMMA3_TEMPLATE, "class": "Gemma3", "tokenizer_class": "GemmaTokenizer",
               "specials": ["<start_of_turn>", "<end_of_turn>"], "bos": "<bos>", "eos": "<end_of_turn>",
               "spm_eos": "<eos>",
               "unk": "<unk>", "pad": "<pad>", "dummy_prefix": False,
               "config": {**SMALL, "num_hidden_layers": 6, "num_key_value_heads": 1, "head_dim": 16,
                          "query_pre_attn_scalar": 16, "sliding_window": 32,
                          "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                          "final_logit_softcapping": None, "attn_logit_softcapping": None,
                          "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "rms_norm_eps": 1e-6}},
    "phi4-mini": {"kind": "bpe", "regex": GPT4O_REGEX, "template": PHI4_MINI_TEMPLATE, "class": "Phi3",
                  "tokenizer_class": "GPT2Tokenizer",
                  "specials": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                  "eos": "<|end|>", "pad": "<|endoftext|>",
                  "config": {**SMALL, "partial_rotary_factor": 0.75, "tie_word_embeddings": True,
                             "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                             "rope_scaling": {"type": "longrope", "long_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                              "short_factor": [1.0, 1.0, 1.05, 1.1, 1.2, 1.3]},
                             "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu"}},
    "phi3.5": {"kind": "spm", "template": PHI35_TEMPLATE, "class": "Phi3", "tokenizer_class": "LlamaTokenizer",
               "specials": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
               "rstrip": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "legacy": True,
               "bos": "<s>", "eos": "<|end|>", "spm_eos": "</s>", "unk": "<unk>", "pad": "<|endoftext|>",
               "dummy_prefix": True,
               "config": {**SMALL, "num_key_value_heads": 4, "tie_word_embeddings": False,
                          "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                          "rope_scaling": {"type": "longrope", "long_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                                           "short_factor": [1.0] * 8},
                          "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu"}},
}


def _corpus() -> list[str]:
    texts = []
    for line in (REPO / "examples" / "persona" / "persona.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    texts.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\ "
                 "Café naïve résumé — “quotes” 🦙🚀 中文字符 Русский текст \t\n")
    return texts


def _bpe_tokenizer(spec: dict, out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus(), trainer)
    bos = spec.get("bos")
    if bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=spec["eos"], pad_token=spec.get("pad"),
                                  chat_template=spec["template"])
    tok.save_pretrained(out)
    if spec.get("tokenizer_class"):  # the class the family's own tokenizer_config.json names
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": spec["tokenizer_class"]}))
    return tok


def _spm_tokenizer(spec: dict, out: Path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    work = out.parent / (out.name + ".spm")
    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    reserved = [p for p in (spec.get("unk"), spec.get("bos"), spec.get("spm_eos", spec.get("eos")), spec.get("pad")) if p]
    users = [s for s in spec["specials"] if s not in reserved]
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "m"), vocab_size=700, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=spec["dummy_prefix"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, unk_piece=spec["unk"], bos_id=1, bos_piece=spec["bos"],
        eos_id=2, eos_piece=spec.get("spm_eos", spec["eos"]),
        pad_id=3 if spec.get("pad") and spec["pad"] not in users else -1,
        pad_piece=spec.get("pad") or "<pad>", user_defined_symbols=users, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes((work / "m.model").read_bytes())
    cfg = {"tokenizer_class": spec["tokenizer_class"], "bos_token": spec["bos"], "eos_token": spec["eos"],
           "unk_token": spec["unk"], "add_bos_token": True, "add_eos_token": False, "chat_template": spec["template"],
           "legacy": spec.get("legacy", False)}
    if spec.get("pad"):
        cfg["pad_token"] = spec["pad"]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(out, additional_special_tokens=users)
    tok.save_pretrained(out)  # tokenizer.json beside tokenizer.model, as the families ship them
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    if spec.get("legacy"):  # the Llama-2-era tokenizer.json these families ship: the marker before every text piece
        tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                                 {"type": "Replace", "pattern": {"String": " "},
                                                                  "content": "\u2581"}]}
        tj["pre_tokenizer"] = None
    for a in tj["added_tokens"]:  # Phi-3's chat tokens swallow the whitespace after them (its tokenizer.json says so)
        if a["content"] in spec.get("rstrip", ()):
            a["rstrip"] = True
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return AutoTokenizer.from_pretrained(out)


def build(name: str, root: Path | None = None) -> Path:
    """The family's tiny model folder (built once under ``root``, default the test cache dir)."""
    import torch
    import transformers

    spec = FAMILIES[name]
    root = Path(root or os.environ.get("DUET_CACHE_DIR") or "/tmp") / "families"
    out = root / name
    if (out / "config.json").is_file():
        return out
    tmp = root / f".{name}.building"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = (_bpe_tokenizer if spec["kind"] == "bpe" else _spm_tokenizer)(spec, tmp)
    vocab = len(tok) + spec.get("vocab_pad", 0)
    ids = {"eos_token_id": tok.convert_tokens_to_ids(spec["eos"]),
           "bos_token_id": tok.convert_tokens_to_ids(spec["bos"]) if spec.get("bos") else None,
           "pad_token_id": tok.convert_tokens_to_ids(spec["pad"]) if spec.get("pad") else None}
    cls = spec["class"]
    if cls == "Gemma3":
        cfg = transformers.Gemma3TextConfig(vocab_size=vocab, **ids, **spec["config"])
        model_cls = transformers.Gemma3ForCausalLM
    else:
        cfg = getattr(transformers, f"{cls}Config")(vocab_size=vocab, **ids, **spec["config"])
        model_cls = getattr(transformers, f"{cls}ForCausalLM")
    torch.manual_seed(0)
    model = model_cls(cfg)
    with torch.no_grad():  # random weights as large as a trained model's, so logits are not all near ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(tmp)
    if (tmp / "tokenizer.model").is_file() is False and spec["kind"] == "spm":
        raise RuntimeError("the SentencePiece model was not kept")
    tmp.rename(out)
    return out
