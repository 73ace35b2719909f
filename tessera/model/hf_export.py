"""The files transformers and vLLM read besides config.json and the weights, written from our own
config.

An `hf` export (transformers `InternVLForConditionalGeneration`) gets:
- tokenizer_config.json: `PreTrainedTokenizerFast`, which runs tokenizer.json exactly as Tessera
  does (transformers' Qwen2 tokenizer class rebuilds the pre-tokenizer from its own regex and
  re-tokenises some strings differently); eos `<|im_end|>`; and the named image tokens transformers'
  `InternVLProcessor` reads from the tokenizer (`start_image_token`, `end_image_token`,
  `context_image_token`, `video_token`);
- preprocessor_config.json (GOT-OCR2's tiling image processor: the model's tile size, min/max tiles)
  and processor_config.json (`image_seq_length`: the model's tokens per tile; transformers assumes
  256 without it);
- chat_template.jinja: Tessera's prompt (`ChatTokenizer.render`), with `<IMG_CONTEXT>` where an
  image goes (the processor expands it to `<img>` + `<IMG_CONTEXT>` × tiles·T + `</img>`);
- generation_config.json: the stop tokens Tessera's engine stops on.
An `official` export (`InternVLChatModel`, read with `trust_remote_code`) gets the tokenizer files,
the template (with the official `<image>` placeholder) and our configuration module
(tessera/model/remote) with `auto_map`.

transformers and vLLM have no Visual Resolution Router, so the hf export of a Flash model leaves out
the router and the 1/16 projector (`strip_flash`) and says so in one line; the full model stays in
the tessera and official layouts. Tessera's question-aware router (`question_router.*`) is left out
with them and named in that line. Where it is kept (the official layout, or hf with --keep-flash,
under Tessera's own names) a line at INFO says that only Tessera reads it (`question_router_note`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from tessera.chat import (
    DEFAULT_SYSTEM,
    EMPTY_THINK,
    END_THINK,
    ENDOFTEXT,
    FINAL_HEADER,
    H_END,
    H_MESSAGE,
    H_RETURN,
    H_START,
    HARMONY_TOKENS,
    IM_END,
    IM_START,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    THINK,
    ChatTokenizer,
)
from tessera.config import FlashConfig, ModelConfig
from tessera.image import IMAGENET_MEAN, IMAGENET_STD
from tessera.model.layouts import FLASH_PREFIXES, QUESTION_ROUTER_PREFIX

log = logging.getLogger(__name__)

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_CONFIG = "configuration_internvl_chat.py"
OFFICIAL_IMAGE = (
    "<image>"  # what the official InternVL loaders (and vLLM's InternVLChatModel) expand
)
TEMPLATE_FILE = "chat_template.jinja"
VIDEO_TOKENS = ("<video>", "<quad>")


class ExportError(ValueError):
    """A model the target loaders cannot be given as it is."""


# ---- Flash → hf
# ---------------------------------------------------------------------------------------


def strip_flash(
    config: ModelConfig, state: dict[str, torch.Tensor]
) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    """(config without Flash, tessera-named state without router/mlp2, the one-line note) for an hf
    export;
    a plain model comes back unchanged with no note."""
    if not config.flash.enabled:
        return config, state, None
    dropped = [k for k in state if k.startswith(FLASH_PREFIXES)]
    asking = [k for k in state if k.startswith(QUESTION_ROUTER_PREFIX)]
    left_out = (*FLASH_PREFIXES, QUESTION_ROUTER_PREFIX)
    kept = {k: v for k, v in state.items() if not k.startswith(left_out)}
    numel = sum(state[k].numel() for k in dropped)
    plain = dataclasses.replace(config, flash=FlashConfig(enabled=False))
    question = (
        f" and the question-aware router ({QUESTION_ROUTER_PREFIX}*: {len(asking)} tensors, "
        f"{sum(state[k].numel() for k in asking):,} values)"
        if asking
        else ""
    )
    note = (
        "hf export: left out the Flash router and 1/16 projector (mlp2, pooling_before_gating, "
        f"gating: {len(dropped)} tensors, {numel:,} values){question}, which transformers and vLLM "
        "do not have; the export is the full-resolution model (every tile at 1/4). The full Flash "
        "model stays in the tessera and official layouts (tessera convert SRC DST --to "
        "tessera|official)."
    )
    return plain, kept, note


def question_router_note(
    config: ModelConfig, state: dict[str, torch.Tensor], layout: str
) -> str | None:
    """The one line for an official or hf (--keep-flash) folder that keeps the question-aware router
    under Tessera's own names; None for a model without one."""
    asking = [k for k in state if k.startswith(QUESTION_ROUTER_PREFIX)]
    if not config.flash.question_router or not asking:
        return None
    where = QUESTION_ROUTER_PREFIX if layout == "official" else "model." + QUESTION_ROUTER_PREFIX
    return (
        f"{layout} layout: kept the question-aware router under {where}* ({len(asking)} tensors), "
        "a Tessera extension that neither the released InternVL code nor transformers (nor its "
        "InternvlFlash port) has: only Tessera reads it back; other loaders ignore it as unused "
        "weights (tessera convert SRC DST --to hf leaves it out)."
    )


# ---- tokenizer
# ----------------------------------------------------------------------------------------


def _need(tok: ChatTokenizer, token: str) -> int:
    i = tok.tokenizer.token_to_id(token)
    if i is None:
        raise ExportError(f"the tokenizer has no {token} token, which the export's template needs")
    return i


def video_token(tok: ChatTokenizer) -> str:
    """The processor's video placeholder: one token, not the image token. Tessera has no video path;
    when the vocabulary has no `<video>`, `<quad>` (InternVL's OCR-box token, which prompts do not
    use) stands in, so the
    export needs no new token (one would change the vocabulary the model was trained with)."""
    for t in VIDEO_TOKENS:
        if tok.tokenizer.token_to_id(t) is not None:
            return t
    raise ExportError(
        f"the tokenizer has none of {', '.join(VIDEO_TOKENS)}, one of which transformers' "
        "InternVL processor needs as its video placeholder"
    )


def tokenizer_config(tok: ChatTokenizer, config: ModelConfig) -> dict[str, Any]:
    """tokenizer_config.json: the fast tokenizer as stored, our stop token, and the named image
    tokens."""
    turn_tokens = HARMONY_TOKENS if tok.harmony else [IM_START, IM_END]
    for t in (*turn_tokens, IMG_START, IMG_END, IMG_CONTEXT):
        _need(tok, t)
    stop = H_RETURN if tok.harmony else IM_END
    pad = ENDOFTEXT if tok.tokenizer.token_to_id(ENDOFTEXT) is not None else stop
    return {
        # runs tokenizer.json as it is (the Qwen2 class would rebuild our pre-tokenizer differently)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": stop,
        "pad_token": pad,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.language.max_position_embeddings,
        "padding_side": "left",
        # read by transformers' InternVLProcessor (and vLLM through it)
        "extra_special_tokens": {
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": video_token(tok),
        },
    }


def generation_config(tok: ChatTokenizer) -> dict[str, Any]:
    """The engine's stop tokens: <|im_end|> and the pad token (<|endoftext|>)."""
    stops = sorted({tok.im_end_id, tok.pad_id})
    return {
        "eos_token_id": stops if len(stops) > 1 else stops[0],
        "pad_token_id": tok.pad_id,
        "bos_token_id": None,
    }


# ---- chat template
# ------------------------------------------------------------------------------------


def _q(text: str) -> str:
    """A Jinja string literal."""
    return json.dumps(text)


# Tessera's prompt in Jinja (both templates: ChatML-style internvl2_5 and Harmony-style
# internvl3_5_gpt_oss differ only in the turn delimiters); every line starts with a `-` marker, so
# no newline of this text reaches the output. @NAME@ are filled in by `chat_template`.
_TEMPLATE = r"""
{%- set ns = namespace(system=none, images=0, k=0, blocks='', texts=[]) -%}
{%- for m in messages -%}
  {%- if m.role in ['system', 'developer'] -%}
    {%- if m.content is string -%}
      {%- set t = m.content -%}
    {%- else -%}
      {%- set t = m.content | selectattr('type', 'equalto', 'text') | map(attribute='text')
          | join('\n') -%}
    {%- endif -%}
    {%- set ns.system = t if ns.system is none else ns.system ~ '\n' ~ t -%}
  {%- elif m.content is not string and m.content is not none -%}
    {%- for p in m.content if p.type != 'text' -%}
      {%- set ns.images = ns.images + 1 -%}
    {%- endfor -%}
  {%- endif -%}
{%- endfor -%}
{%- set system = @SYSTEM@ if ns.system is none else ns.system -%}
{%- if system -%}
  {{- @START@ ~ 'system' ~ @SEP@ ~ system ~ @END@ -}}
{%- endif -%}
{%- for m in messages if m.role not in ['system', 'developer'] -%}
  {%- set ns.blocks = '' -%}
  {%- set ns.texts = [] -%}
  {%- if m.content is string -%}
    {%- set ns.texts = [m.content] -%}
  {%- elif m.content is not none -%}
    {%- for p in m.content -%}
      {%- if p.type == 'text' -%}
        {%- set ns.texts = ns.texts + [p.text] -%}
      {%- else -%}
        {%- set ns.k = ns.k + 1 -%}
        {%- set label = 'Image-' ~ ns.k ~ ': ' if ns.images > 1 else '' -%}
        {%- set ns.blocks = ns.blocks ~ label ~ @IMAGE@ ~ '\n' -%}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {%- set body = ns.texts | join('\n') -%}
  {%- if m.role == 'assistant' and @END_THINK@ in body -%}
    {%- set body = body.split(@END_THINK@, 1)[1].replace(@THINK@, '').strip() -%}
  {%- endif -%}
  {{- @START@ ~ m.role ~ @SEP@ ~ ns.blocks ~ body ~ @END@ -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- @GENERATION@ -}}
  {%- if not enable_thinking | default(false) -%}
    {{- @NO_THINK@ -}}
  {%- endif -%}
{%- endif -%}
"""


def chat_template(
    image: str = IMG_CONTEXT, system: str = DEFAULT_SYSTEM, harmony: bool = False
) -> str:
    """Jinja rendering `ChatTokenizer.render` (internvl2_5, or internvl3_5_gpt_oss when `harmony`:
    `<|start|>role<|message|>…<|end|>` turns, the answer after the final channel's header) of
    OpenAI-style messages, `image`
    standing for each image: system/developer messages joined by newlines (the default system
    message when there is none, no system turn when it is empty), each turn's images first
    (numbered `Image-k: ` across the conversation when it has more than one), text parts joined by
    newlines, earlier answers without their think blocks, and the assistant's start with an empty
    think block unless `enable_thinking`."""
    if harmony:  # ChatTokenizer.turn / assistant_start, Harmony-style
        delimiters = {"START": H_START, "SEP": H_MESSAGE, "END": H_END}
        delimiters |= {"GENERATION": H_START + "assistant", "NO_THINK": FINAL_HEADER}
    else:
        delimiters = {"START": IM_START, "SEP": "\n", "END": IM_END + "\n"}
        delimiters |= {"GENERATION": IM_START + "assistant\n", "NO_THINK": EMPTY_THINK}
    values = {
        "SYSTEM": system,
        "IMAGE": image,
        "THINK": THINK,
        "END_THINK": END_THINK,
        **delimiters,
    }
    text = _TEMPLATE.strip() + "\n"
    for name, value in values.items():
        text = text.replace(f"@{name}@", _q(value))
    return text


# ---- image processor
# ----------------------------------------------------------------------------------


def preprocessor_config(config: ModelConfig) -> dict[str, Any]:
    """GOT-OCR2's tiling processor (what InternVL's -hf checkpoints use) with this model's tiles."""
    if not config.use_thumbnail:
        raise ExportError(
            "transformers' InternVL image processor always appends a thumbnail; this model has "
            "use_thumbnail false (export it with --to tessera or --to official)"
        )
    s = config.tile_size
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": True,
        "min_patches": config.min_tiles,
        "max_patches": config.max_tiles,
        "size": {"height": s, "width": s},
        "do_resize": True,
        "resample": 3,  # 3 = bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


def processor_config(config: ModelConfig) -> dict[str, Any]:
    return {"processor_class": "InternVLProcessor", "image_seq_length": config.tokens_per_tile}


# ---- the folder
# ---------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_loader_files(
    path: str | Path, config: ModelConfig, tokenizer: ChatTokenizer | None, layout: str
) -> list[str]:
    """Write the hf or official layout's loader files into `path` (config.json is already there);
    returns
    their names. Without a tokenizer only the files that do not need one are written."""
    path = Path(path)
    written: list[str] = []
    if layout == "hf":
        _write_json(path / "preprocessor_config.json", preprocessor_config(config))
        _write_json(path / "processor_config.json", processor_config(config))
        written += ["preprocessor_config.json", "processor_config.json"]
    elif layout == "official":
        shutil.copyfile(REMOTE_DIR / REMOTE_CONFIG, path / REMOTE_CONFIG)
        written.append(REMOTE_CONFIG)
    else:
        raise ValueError(
            f"loader files are written for the hf and official layouts, not {layout!r}"
        )
    if tokenizer is not None:
        template = chat_template(
            IMG_CONTEXT if layout == "hf" else OFFICIAL_IMAGE, tokenizer.system, tokenizer.harmony
        )
        tok_cfg = tokenizer_config(tokenizer, config)
        tok_cfg["chat_template"] = template
        _write_json(path / "tokenizer_config.json", tok_cfg)
        (path / TEMPLATE_FILE).write_text(template)
        _write_json(path / "generation_config.json", generation_config(tokenizer))
        written += ["tokenizer_config.json", TEMPLATE_FILE, "generation_config.json"]
    return written


def official_auto_map() -> dict[str, str]:
    """config.json's `auto_map` for the official layout: our configuration module, shipped in the
    folder."""
    return {"AutoConfig": f"{REMOTE_CONFIG.removesuffix('.py')}.InternVLChatConfig"}
