"""A zoo of real chat-template shapes, as test fixtures for rendering and assistant masking.

`ZOO` maps a name to Jinja source. The built-ins are read from `lora_chat/templates/builtin/*.jinja`;
the others are copied from the models' tokenizer_config.json `chat_template` (noted per entry), or,
where marked SYNTHETIC, written to exhibit one shape that real templates have.

Conventions the tables below assume: templates are rendered the way transformers'
`apply_chat_template` does (trim_blocks, lstrip_blocks, `raise_exception`), with
`bos_token="<s>"` and `eos_token="</s>"` (TEST_BOS / TEST_EOS) whatever the real model uses.

`ZOO_ROLES`  roles each template accepts: renders without raising AND writes the content somewhere
             (some renderings of a conversation may still drop it, see ZOO_SYSTEM).
`ZOO_SYSTEM` how a system message is handled: "turn" (its own block), "prefix" (plain text ahead of
             the first turn, replacing a default preamble), "merged_first_user" (inside the first
             user turn), "merged_last_user" (inside the last user turn, and only when that user turn
             is the final message: training renderings drop it), "raises", "dropped" (silently).
`ZOO_DEFAULT_SYSTEM`  templates that write a system block/preamble of their own when none is given.
`ZOO_EOT`    the end-of-turn text the template writes right after an assistant reply (what the model
             must learn to emit to stop), with TEST_EOS standing for eos_token; `ZOO_EOT_IS_EOS`
             names the ones where that text comes from the eos_token variable (use `eot(name, eos)`).

Prefix property the masking relies on, for every assistant message k:
    render(m[:k], add_generation_prompt=True)  is a prefix of  render(m[:k+1])
    render(m[:k+1])                            is a prefix of  render(m)
Checked for every entry with and without a system message (2 user/assistant exchanges). It HOLDS for
all entries except these (expected; the masking code must handle or refuse them):

  * phi3, phi35  -- without a generation prompt the rendering ends with eos_token, so
      render(m[:k+1]) = "...<|assistant|>\\nA1<|end|>\\n</s>" while the full conversation continues
      "...<|assistant|>\\nA1<|end|>\\n<|user|>...": an earlier reply's rendering is not a prefix of the
      whole (the reply and '<|end|>' are, the trailing eos_token is not). The generation-prompt half
      holds. Only the final reply is followed by eos_token in the full rendering.
  * mistral (v0.3) -- only with a system message, and only the generation-prompt half: the system
      prompt is merged into the LAST user turn, and only while that user turn is the final message.
      render(m[:k], add_generation_prompt=True) = "<s>[INST] SYS\\n\\nU1[/INST]" but
      render(m[:k+1]) = "<s>[INST] U1[/INST] A1</s>" (no system text once a reply follows), for every
      reply, the last one included. render(m[:k+1]) IS a prefix of render(m). Consequence beyond
      masking: a training rendering of a conversation that ends with a reply never contains the
      system prompt, while the inference prompt does. Without a system message the property holds.
  * qwen3 -- the reply after the last user query is rendered with a '<think>\\n...\\n</think>\\n\\n'
      block (an EMPTY one when the message has no reasoning), earlier replies without it and with
      any '<think>...</think>' in their content stripped. render(m[:k+1]) for an earlier reply k has
      "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\nA1<|im_end|>" where render(m) has
      "<|im_start|>assistant\\nA1<|im_end|>": not a prefix. The generation-prompt half holds; the
      final reply's span in render(m) includes the '<think>\\n\\n</think>\\n\\n' block (the template, not
      the data, wrote it).

Shapes where the prefix property holds but a naive "reply + end of turn" span is still wrong:

  * chatml_no_final_eot -- the final message gets no '<|im_end|>' (loop.last), so render(m[:k+1])
      ends right after the reply text: the property holds, but the span of EVERY reply measured that
      way stops before '<|im_end|>' (the model never learns to stop).
  * olmo2 -- the final reply is followed by eos_token without the '\\n' earlier ones get: harmless.
  * falcon -- no end-of-turn token at all; a reply ends with '\\n' (the only stop signal).
  * phi3_mini_v1 -- no generation prompt: every user turn already ends with '<|assistant|>\\n'.
  * mistral_v01, mistral, deepseek, vicuna, openchat -- the generation prompt (or the prompt's end,
      '[/INST]') is followed by the reply with no newline; in mistral, deepseek, vicuna and openchat
      the text after the prompt starts with the space that separates '[/INST]' / 'Assistant:' /
      'ASSISTANT:' / 'GPT4 Correct Assistant:' from the reply.
  * llama3, llama31, gemma, gemma1, gemma3, mistral, llama2, command_r, chatml_trim -- content is
      trimmed (llama2/command_r/chatml_trim: user turns too), so a reply with surrounding whitespace
      does not appear verbatim; spans must be measured in the rendering, not searched as raw text.
"""

from __future__ import annotations

from pathlib import Path

TEST_BOS = "<s>"
TEST_EOS = "</s>"

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "lora_chat" / "templates" / "builtin"
BUILTINS = ("chatml", "llama3", "mistral", "gemma", "phi3", "zephyr", "qwen2", "vicuna", "alpaca")

ZOO: dict[str, str] = {name: (BUILTIN_DIR / f"{name}.jinja").read_text(encoding="utf-8") for name in BUILTINS}

# HuggingFaceTB/SmolLM2-*-Instruct: ChatML with a default system turn.
ZOO["smollm2"] = (
    r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""
)

# meta-llama/Llama-2-7b-chat-hf: system merged into the first user turn, BOS before EVERY user turn,
# ' </s>' after replies, content stripped, raises on non-alternation, no generation prompt.
ZOO["llama2"] = (
    r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"""
)

# meta-llama/Llama-3.1-8B-Instruct: always writes a system header with the knowledge/today dates.
ZOO["llama31"] = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# mistralai/Mixtral-8x7B-Instruct-v0.1 (= Mistral-7B-Instruct-v0.1's first template): raises on system,
# '[INST] u [/INST]' then the reply glued to it, eos_token after each reply, no generation prompt.
ZOO["mistral_v01"] = (
    r"""{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""
)

# TinyLlama/TinyLlama-1.1B-Chat-v1.0 (identical to HuggingFaceH4/zephyr-7b-beta), verbatim with its
# layout newlines (trim_blocks removes the ones after block tags; those after '}}' are output).
ZOO["tinyllama"] = r"""{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# microsoft/Phi-3.5-mini-instruct: like phi3 but an EMPTY system message is dropped.
ZOO["phi35"] = (
    r"""{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"""
)

# microsoft/Phi-3-mini-4k-instruct, first (April 2024) template: BOS, system silently DROPPED, every user
# turn already ends with '<|assistant|>\n', add_generation_prompt ignored.
ZOO["phi3_mini_v1"] = (
    r"""{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"""
)

# google/gemma-7b-it (Gemma-1): same output as the gemma built-in (Gemma-2), one-line source.
ZOO["gemma1"] = (
    r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"""
)

# google/gemma-3-*-it: system MERGED into the first user turn (system + '\n\n' + user), content trimmed.
ZOO["gemma3"] = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Qwen/Qwen2.5-7B-Instruct, complete (tools in the system turn, tool_calls, tool responses).
ZOO["qwen25_tools"] = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen3-8B: renders the LAST assistant turn(s) (after the last user query) differently from earlier
# ones: '<think>\n...\n</think>\n\n' kept (empty when there is no reasoning) there, stripped before.
ZOO["qwen3"] = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# deepseek-ai/deepseek-llm-7b-chat (and deepseek-math-7b-rl): 'User: ...\n\nAssistant: ...<eos>', the
# real eos_token being '<｜end▁of▁sentence｜>'; system is plain text ahead of the turns.
ZOO["deepseek"] = (
    r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"""
)

# CohereForAI/c4ai-command-r-v01 ('default' template): <|START_OF_TURN_TOKEN|> turns, content stripped,
# raises on non-alternation.
ZOO["command_r"] = (
    r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% elif false == true %}{% set loop_messages = messages %}{% set system_message = 'You are Command-R, a brilliant, sophisticated, AI-assistant trained to assist human users by providing thorough responses. You are trained by Cohere.' %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% if system_message != false %}{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% set content = message['content'] %}{% if message['role'] == 'user' %}{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% elif message['role'] == 'assistant' %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"""
)

# openchat/openchat-3.5-0106: 'GPT4 Correct ' + Role.title() + ': ' + content + '<|end_of_turn|>'.
# A system message renders as 'GPT4 Correct System: ...' (accepted, though not a trained role).
ZOO["openchat"] = (
    r"""{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + ': ' + message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}{{ 'GPT4 Correct Assistant:' }}{% endif %}"""
)

# tiiuae/falcon-11B, verbatim with its layout newlines: plain text 'User: \n...\nFalcon:\n...\n', no
# special tokens at all; the newline written after each message is the only end of turn.
ZOO["falcon"] = r"""{% for message in messages %}
{% if message['role'] == 'user' %}
{{ 'User: \n' + message['content'] }}
{% elif message['role'] == 'system' %}
{{ 'System: ' + message['content'] }}
{% elif message['role'] == 'assistant' %}
{{ 'Falcon:\n'  + message['content']}}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ 'Falcon:' }}
{% endif %}
{% endfor %}"""

# SYNTHETIC, in the style of TRL's training templates / SmolLM3: ChatML whose assistant reply and
# '<|im_end|>' are wrapped in {% generation %} markers (return_assistant_tokens_mask works on it).
ZOO["chatml_generation"] = r"""{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# SYNTHETIC: ChatML that trims every message (the `| trim` of Llama-3/Gemma on a plain shape).
ZOO["chatml_trim"] = (
    r"""{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""
)

# allenai/OLMo-2-1124-7B-Instruct (= Tulu-3): uses loop.last to leave out the '\n' after the final
# reply's eos_token; the generation prompt is written only after the last message.
ZOO["olmo2"] = (
    r"""{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"""
)

# turboderp/Cat-Llama-3-70B-instruct (also FINGU-AI/FinguAI-Chat-v1): ChatML that uses loop.last to
# OMIT '<|im_end|>' after the final message unless a generation prompt follows.
ZOO["chatml_no_final_eot"] = (
    r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBelow is a conversation between a curious user and a helpful AI assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']}}{% if (loop.last and add_generation_prompt) or not loop.last %}{{ '<|im_end|>' + '\n'}}{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>assistant\n' }}{% endif %}"""
)

# databricks/dbrx-instruct: ChatML where the newline comes BEFORE each later message instead of after
# it, with a long default system prompt.
ZOO["dbrx"] = (
    r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% elif 'system' not in messages[0]['role'] %}{% set loop_messages = messages %}{% set system_message = 'You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions based on information available up to that point.\nYOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more complex and open-ended questions.\nYou assist with various tasks, from writing to coding (using markdown for code blocks — remember to use ``` with code, JSON, and tables).\n(You do not have real-time data access or code execution capabilities. You avoid stereotyping and provide balanced perspectives on controversial topics. You do not provide song lyrics, poems, or news articles and do not divulge details of your training data.)\nThis is your system prompt, guiding your responses. Do not reference it, just respond to the user. If you find yourself talking about this message, stop. You should be responding appropriately and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER\'S QUERY.' %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 %}{% if system_message != false %}{{ '<|im_start|>system\n' + system_message | trim + '<|im_end|>\n'}}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}{% else %}{{ '\n' + '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}{% endif %}{% if (add_generation_prompt == true and loop.last) %}{{ '\n' + '<|im_start|>' + 'assistant' + '\n' }}{% endif %}{% endfor %}"""
)

_SUA = {"system", "user", "assistant"}
_UA = {"user", "assistant"}

ZOO_ROLES: dict[str, set[str]] = {
    "chatml": _SUA | {"tool"},  # any role name is written as is
    "llama3": _SUA | {"tool"},  # any role name is written as is
    "mistral": _SUA,  # system only lands when the last message is a user turn
    "gemma": _UA,
    "phi3": _SUA,
    "zephyr": _SUA,
    "qwen2": _SUA | {"tool"},
    "vicuna": _SUA,
    "alpaca": _SUA,
    "smollm2": _SUA | {"tool"},
    "llama2": _SUA,
    "llama31": _SUA | {"tool", "ipython"},
    "mistral_v01": _UA,
    "tinyllama": _SUA,
    "phi35": _SUA,
    "phi3_mini_v1": _UA,  # system is accepted but silently dropped
    "gemma1": _UA,
    "gemma3": _SUA,
    "qwen25_tools": _SUA | {"tool"},
    "qwen3": _SUA | {"tool"},
    "deepseek": _SUA,
    "command_r": _SUA,
    "openchat": _SUA,  # 'GPT4 Correct System:'
    "falcon": _SUA,
    "chatml_generation": _SUA | {"tool"},
    "chatml_trim": _SUA | {"tool"},
    "olmo2": _SUA,
    "chatml_no_final_eot": _SUA | {"tool"},
    "dbrx": _SUA | {"tool"},
}

ZOO_SYSTEM: dict[str, str] = {
    "chatml": "turn", "llama3": "turn", "mistral": "merged_last_user", "gemma": "raises", "phi3": "turn",
    "zephyr": "turn", "qwen2": "turn", "vicuna": "prefix", "alpaca": "prefix", "smollm2": "turn",
    "llama2": "merged_first_user", "llama31": "turn", "mistral_v01": "raises", "tinyllama": "turn",
    "phi35": "turn", "phi3_mini_v1": "dropped", "gemma1": "raises", "gemma3": "merged_first_user",
    "qwen25_tools": "turn", "qwen3": "turn", "deepseek": "prefix", "command_r": "turn", "openchat": "turn",
    "falcon": "turn", "chatml_generation": "turn", "chatml_trim": "turn", "olmo2": "turn",
    "chatml_no_final_eot": "turn", "dbrx": "turn",
}

# Templates that write a system block or preamble of their own when the conversation has none.
ZOO_DEFAULT_SYSTEM: set[str] = {"qwen2", "qwen25_tools", "smollm2", "vicuna", "alpaca", "llama31",
                                "chatml_no_final_eot", "dbrx"}

ZOO_EOT: dict[str, str] = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": TEST_EOS,
    "gemma": "<end_of_turn>",
    "phi3": "<|end|>",
    "zephyr": TEST_EOS,
    "qwen2": "<|im_end|>",
    "vicuna": TEST_EOS,
    "alpaca": TEST_EOS,
    "smollm2": "<|im_end|>",
    "llama2": " " + TEST_EOS,  # ' ' + eos_token
    "llama31": "<|eot_id|>",
    "mistral_v01": TEST_EOS,
    "tinyllama": TEST_EOS,
    "phi35": "<|end|>",
    "phi3_mini_v1": "<|end|>",
    "gemma1": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "qwen25_tools": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "deepseek": TEST_EOS,  # the real eos_token is '<｜end▁of▁sentence｜>'
    "command_r": "<|END_OF_TURN_TOKEN|>",
    "openchat": "<|end_of_turn|>",
    "falcon": "\n",  # no end-of-turn token: the newline after the reply is all there is
    "chatml_generation": "<|im_end|>",
    "chatml_trim": "<|im_end|>",
    "olmo2": TEST_EOS,
    "chatml_no_final_eot": "<|im_end|>",  # except after the final message, where nothing follows
    "dbrx": "<|im_end|>",
}

ZOO_EOT_IS_EOS: set[str] = {"mistral", "zephyr", "vicuna", "alpaca", "llama2", "mistral_v01", "tinyllama",
                            "deepseek", "olmo2"}


def eot(name: str, eos_token: str = TEST_EOS) -> str:
    """The end-of-turn text `name` writes after a reply when rendered with this eos_token."""
    text = ZOO_EOT[name]
    return text.replace(TEST_EOS, eos_token) if name in ZOO_EOT_IS_EOS else text


assert set(ZOO) == set(ZOO_ROLES) == set(ZOO_SYSTEM) == set(ZOO_EOT), "zoo tables out of step"
