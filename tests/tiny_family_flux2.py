"""FLUX.2 for the cross-family tests (tests/test_families.py): tiny real classes, built offline.

The transformer is a tiny ``Flux2Transformer2DModel`` (3 double blocks, one single block, 4 RoPE axes).
Two tiny pipelines of the real classes share it: ``Flux2Pipeline`` (FLUX.2 [dev]: a tiny
``Mistral3ForConditionalGeneration`` with a Tekken-style byte-level BPE tokenizer that pads on the left,
as the real one does, and the Mistral Small 3.1 chat template) and ``Flux2KleinPipeline`` (FLUX.2
[klein]: a tiny ``Qwen3ForCausalLM`` with a ``Qwen2TokenizerFast`` that pads on the right and the Qwen3
chat template). Both text encoders are deep enough for the pipelines' default stacked layers
((10, 20, 30) and (9, 18, 27)), 16 wide, so ``joint_attention_dim`` is 48. The VAE is a tiny
``AutoencoderKLFlux2`` whose batch-norm statistics are random (so the pipeline's latent normalisation is
not the identity). FLUX.2 [dev]'s real tokenizer is a ``PixtralProcessor``, which needs torchvision (not
installed here); the tiny [dev] pipeline uses the processor's tokenizer class directly, with the same
chat template (the pipeline calls the same ``apply_chat_template`` on either).

The cross-family tests use the [klein] pipeline (its true CFG makes two transformer calls per step);
test_families_flux2.py covers [dev].
"""

from __future__ import annotations

import torch

FAMILY = "flux2"
HIDDEN = 16  # the text encoders' width; the prompt embeddings stack 3 layers
TEXT_WIDTH = 3 * HIDDEN
GUIDANCE = 3.5
#: MMDiTPipeline.generate / encode keyword arguments of a quick run (a non-square image); [klein] runs true
#: CFG (guidance_scale > 1, not distilled): an unconditional call after each prompt call.
GENERATE = dict(height=32, width=48, steps=2, guidance=3.0, max_sequence_length=64)
ENCODE = dict(size=(48, 32), max_sequence_length=64)

SYSTEM_WORDS = (
    "you are an ai that reasons about image descriptions you give structured responses focusing on object "
    "relationships attribution and actions without speculation"
)
WORDS = sorted(
    set(SYSTEM_WORDS.split()) | {"dog", "cat", "tree", "sky", "grass", "background", "red", "floor", "person"}
)
WORDS += ["user", "system", "assistant"]

#: The chat template of Mistral Small 3.1 (the processor FLUX.2 [dev] ships).
MISTRAL_TEMPLATE = r"""{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is " + today + ".\n\nWhen you're not sure about some information, you say that you don't have the information and don't make up anything.\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \"What are some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")" %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0] is string %}
        {%- set system_message = messages[0]['content'] %}
        {%- set loop_messages = messages[1:] %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] %}
        {%- set loop_messages = messages[1:] %}
    {%- endif %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] == 'image' or block['type'] == 'image_url' %}
                    {{- '[IMG]' }}
                {%- else %}
                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""

#: The chat template of Qwen3 (the tokenizer FLUX.2 [klein] ships).
QWEN3_TEMPLATE = r"""{%- if tools %}
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
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
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
        {{- message.content }}
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

MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
MISTRAL_SPECIAL += ["[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL_SPECIAL += ["[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Tekken's pre-tokenizer pattern (a word takes the space before it).
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def byte_level_bpe(special: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary: the special tokens, the 256 byte symbols, and merges that make each of WORDS
    one token on its own and one after a space (``Ġword``); any other word falls apart into smaller pieces."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {token: i for i, token in enumerate(special)}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for form in [w for word in WORDS for w in (word, "Ġ" + word)]:
        pieces = ["Ġ", *form[1:]] if form.startswith("Ġ") else list(form)
        while len(pieces) > 1:  # apply the merges so far (lowest rank first), then add the ones still missing
            ranks = {pair: r for r, pair in enumerate(merges)}
            known = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]
            i = min(known)[1] if known else 0
            if not known:
                merges.append((pieces[0], pieces[1]))
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return vocab, merges


def mistral_tokenizer():
    """A Tekken-style tokenizer (byte-level BPE behind Tekken's split pattern) that pads on the left."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = byte_level_bpe(MISTRAL_SPECIAL)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MISTRAL_SPECIAL])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=131072,
    )
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def qwen_tokenizer():
    """A ``Qwen2TokenizerFast`` (Qwen's own pre-tokenizer) on a tiny byte-level vocabulary; pads on the right."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    vocab, merges = byte_level_bpe(QWEN_SPECIAL + ["<think>", "</think>"])
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ["<think>", "</think>"]])
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def mistral_encoder(tokenizer):
    """A tiny ``Mistral3ForConditionalGeneration`` (30 text layers, for the hidden states 10, 20 and 30)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [("bos", "<s>"), ("eos", "</s>")]}
    ids["pad"] = tokenizer.pad_token_id
    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32)
    text.update(num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    text.update(max_position_embeddings=1024, rope_theta=1e9, sliding_window=None)
    text.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    vision = dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    vision.update(intermediate_size=16, image_size=32, patch_size=8, num_channels=3, head_dim=8)
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        vision_feature_layer=-1,
        spatial_merge_size=2,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def qwen_encoder(tokenizer):
    """A tiny ``Qwen3ForCausalLM`` (27 layers, for the hidden states 9, 18 and 27)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(config).eval()


def vae():
    """A tiny ``AutoencoderKLFlux2`` (2x down, 4 latent channels, 2x2 patches) with random batch-norm stats."""
    from diffusers import AutoencoderKLFlux2

    model = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()
    model.bn.running_mean.copy_(torch.randn(16) * 0.1)
    model.bn.running_var.copy_(torch.rand(16) + 0.5)
    return model


def transformer(seed: int = 0, guidance: bool = True, layers: int = 3, single: int = 1):
    """A tiny ``Flux2Transformer2DModel``; ``guidance`` gives it [dev]'s guidance embedder ([klein] has none)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,
    ).eval()


def call_inputs(model, batch: int = 2, h: int = 3, w: int = 5, seed: int = 1, text: int = 7, t: float = 0.5) -> dict:
    """A transformer call as the pipelines make it, on an h x w token grid: ids (t, h, w, l) with text tokens
    at l = 0..text-1 and image tokens at (0, row, col, 0); guidance when the model embeds it."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
    inputs = dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text, TEXT_WIDTH, generator=g),
        timestep=torch.full((batch,), t),
        img_ids=img_ids.expand(batch, -1, -1),
        txt_ids=txt_ids.expand(batch, -1, -1),
        return_dict=False,
    )
    if model.config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), GUIDANCE)
    return inputs


def dev_pipeline(seed: int = 0):
    """A tiny FLUX.2 [dev] ``Flux2Pipeline``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    torch.manual_seed(seed)
    tokenizer = mistral_tokenizer()
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(),
        text_encoder=mistral_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer(seed, guidance=True),
    )


def klein_pipeline(seed: int = 0, distilled: bool = False):
    """A tiny FLUX.2 [klein] ``Flux2KleinPipeline`` (true CFG unless ``distilled``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(),
        text_encoder=qwen_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer(seed, guidance=False),
        is_distilled=distilled,
    )


def pipeline(seed: int = 0):
    return klein_pipeline(seed=seed)
