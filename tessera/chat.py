"""Tokenizer, chat template and label masks.

The template is InternVL's `internvl2_5` (ChatML):

    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT>×T</img>\n{question}<|im_end|>\n
    <|im_start|>assistant\n{answer}<|im_end|>\n

Each image becomes `<img>` + `<IMG_CONTEXT>` × T + `</img>`, T being that image's real token count (from
`tessera.geometry` or the router), so the model can check that the prompt and the features agree.
Thinking mode (Qwen3 / InternVL3.5): the answer is `<think>\n…\n</think>\n\n{final}`; with thinking off the
prompt is prefilled with an empty think block, `<think>\n</think>\n\n`, and the model writes only the final answer.

The GPT-OSS model (InternVL3.5-20B-A4B) uses `internvl3_5_gpt_oss`, Harmony-style:

    <|start|>system<|message|>{system}<|end|><|start|>user<|message|>{user}<|end|>
    <|start|>assistant<|channel|>final<|message|>{answer}<|return|>

Training puts the loss on everything after `<|start|>assistant` (as the official preprocessing does); a prompt
ends at `<|start|>assistant`, and with thinking off it is prefilled with `<|channel|>final<|message|>` (the one
channel the official system message allows). `<|return|>` ends the answer: it is this template's `im_end_id`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
THINK, END_THINK = "<think>", "</think>"

# Order fixes the ids of a tokenizer built by Tessera (tiny preset): <IMG_CONTEXT> is id 3.
SPECIAL_TOKENS = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    IMG_CONTEXT,
    IMG_START,
    IMG_END,
    THINK,
    END_THINK,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]

DEFAULT_SYSTEM = "You are Tessera, a vision-language assistant."
EMPTY_THINK = f"{THINK}\n{END_THINK}\n\n"

TEMPLATES = ("internvl2_5", "internvl3_5_gpt_oss")
H_START, H_MESSAGE, H_END, H_CHANNEL, H_RETURN = (
    "<|start|>",
    "<|message|>",
    "<|end|>",
    "<|channel|>",
    "<|return|>",
)
HARMONY_TOKENS = [H_START, H_MESSAGE, H_END, H_CHANNEL, H_RETURN]
FINAL_HEADER = f"{H_CHANNEL}final{H_MESSAGE}"
# the official internvl3_5_gpt_oss system message
HARMONY_SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: "
    "2024-06\nCurrent date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be "
    "included for every message."
)


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable, or lacks a token the template needs."""


@dataclass
class Example:
    """One tokenised conversation turn for training: ids and a 0/1 mask of the tokens that carry loss."""

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the ids and the template InternVL3.5 needs."""

    def __init__(
        self, tokenizer: Tokenizer, system: str | None = None, template: str = "internvl2_5"
    ):
        if template not in TEMPLATES:
            raise TokenizerError(
                f"unknown chat template {template!r}; choose from {', '.join(TEMPLATES)}"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.harmony = template == "internvl3_5_gpt_oss"
        self.system = (
            system if system is not None else (HARMONY_SYSTEM if self.harmony else DEFAULT_SYSTEM)
        )
        needed = [IMG_START, IMG_END, IMG_CONTEXT] + (
            HARMONY_TOKENS if self.harmony else [IM_START, IM_END, THINK, END_THINK]
        )
        missing = [t for t in needed if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"tokenizer lacks the special token(s) {', '.join(missing)} of template {template}"
            )
        # the turn delimiters: <|im_start|> / <|im_end|>, or Harmony's <|start|> / <|return|> (the stop token)
        self.im_start_id = tokenizer.token_to_id(H_START if self.harmony else IM_START)
        self.im_end_id = tokenizer.token_to_id(H_RETURN if self.harmony else IM_END)
        self.img_start_id = tokenizer.token_to_id(IMG_START)
        self.img_end_id = tokenizer.token_to_id(IMG_END)
        self.img_context_id = tokenizer.token_to_id(IMG_CONTEXT)
        self.think_id = tokenizer.token_to_id(THINK)  # None in a Harmony tokenizer without them
        self.end_think_id = tokenizer.token_to_id(END_THINK)
        eot = tokenizer.token_to_id(ENDOFTEXT)
        self.pad_id = eot if eot is not None else self.im_end_id

    # ---- files ---------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, template: str = "internvl2_5") -> ChatTokenizer:
        """tokenizer.json, or a folder holding one — or, as some InternVL releases ship it, the Qwen2
        files vocab.json + merges.txt with the added tokens in tokenizer_config.json."""
        path = Path(path)
        if path.is_dir():
            if not (path / "tokenizer.json").exists() and has_qwen2_files(path):
                return cls(qwen2_tokenizer(path), template=template)
            path = path / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"no tokenizer at {path}")
        try:
            return cls(Tokenizer.from_file(str(path)), template=template)
        except TokenizerError:
            raise
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save(str(path / "tokenizer.json" if path.is_dir() else path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- text ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def image_block(self, num_tokens: int) -> str:
        return IMG_START + IMG_CONTEXT * num_tokens + IMG_END

    # ---- the chat template: the one renderer (prompts, served conversations, multi-turn training) -----------

    def turn(
        self, role: str, body: str, image_tokens: Sequence[int] = (), numbers: Sequence[int] = ()
    ) -> str:
        """One message: `<|im_start|>{role}\n{images}{body}<|im_end|>\n` (Harmony:
        `<|start|>{role}<|message|>{images}{body}<|end|>`), one `<img>…</img>` block per image
        first (prefixed `Image-k: ` when `numbers` gives the images' 1-based numbers in the conversation)."""
        blocks = self.image_blocks(image_tokens, numbers)
        if self.harmony:
            return f"{H_START}{role}{H_MESSAGE}{blocks}{body}{H_END}"
        return f"{IM_START}{role}\n{blocks}{body}{IM_END}\n"

    def image_blocks(self, image_tokens: Sequence[int], numbers: Sequence[int] = ()) -> str:
        """One `<img>…</img>` line per image, prefixed `Image-k: ` when `numbers` are given."""
        return "".join(
            (f"Image-{k}: " if numbers else "") + self.image_block(t) + "\n"
            for t, k in zip(image_tokens, numbers or [0] * len(image_tokens))
        )

    def user_text(self, question: str, image_tokens: Sequence[int]) -> str:
        """A user turn's content: its images (numbered when more than one), then the question."""
        numbers = range(1, len(image_tokens) + 1) if len(image_tokens) > 1 else ()
        return self.image_blocks(image_tokens, numbers) + question

    def assistant_start(self, thinking: bool) -> str:
        """Where the assistant starts writing; with thinking off, after the empty think block (Harmony: after
        the final channel's header)."""
        if self.harmony:
            return f"{H_START}assistant" + ("" if thinking else FINAL_HEADER)
        return f"{IM_START}assistant\n" + ("" if thinking else EMPTY_THINK)

    def render(
        self,
        turns: Sequence[tuple[str, str, Sequence[int]]],
        image_tokens: Sequence[int] = (),
        thinking: bool = False,
        system: str | None = None,
    ) -> str:
        """The prompt text of a conversation: the system message (the default one when None, none when ""),
        then each (role, body, indices of its images in `image_tokens`) turn, then the assistant's start. With
        more than one image in the conversation, images are numbered `Image-1: `, `Image-2: `, … in order."""
        system = self.system if system is None else system
        text = self.turn("system", system) if system else ""
        numbered = len(image_tokens) > 1
        for role, body, mine in turns:
            text += self.turn(
                role,
                body,
                [image_tokens[i] for i in mine],
                [i + 1 for i in mine] if numbered else (),
            )
        return text + self.assistant_start(thinking)

    def build_prompt(
        self,
        question: str,
        image_tokens: Sequence[int] = (),
        thinking: bool = False,
        system: str | None = None,
    ) -> list[int]:
        """Token ids of a one-question prompt (its images first), ending where the assistant starts writing."""
        ids = self.encode(
            self.render(
                [("user", question, range(len(image_tokens)))], image_tokens, thinking, system
            )
        )
        self.check_image_tokens(ids, image_tokens)
        return ids

    def build_example(
        self,
        question: str,
        answer: str,
        image_tokens: Sequence[int] = (),
        thinking: bool = False,
        system: str | None = None,
    ) -> Example:
        """A training example: loss on the assistant's tokens and its closing `<|im_end|>`, nothing else.

        With thinking on, `answer` is the whole `<think>\\n…\\n</think>\\n\\nfinal` text the model must write.
        """
        if self.harmony:  # loss on the channel header too, as the official preprocessing does
            prompt = self.build_prompt(question, image_tokens, True, system)
            target = self.encode(FINAL_HEADER + answer) + [self.im_end_id]
            return Example(prompt + target, [0] * len(prompt) + [1] * len(target))
        prompt = self.build_prompt(question, image_tokens, thinking, system)
        target = self.encode(answer) + [self.im_end_id]
        return Example(prompt + target, [0] * len(prompt) + [1] * len(target))

    def check_image_tokens(self, ids: Sequence[int], image_tokens: Sequence[int]) -> None:
        count = sum(1 for i in ids if i == self.img_context_id)
        if count != sum(image_tokens):
            raise ValueError(
                f"prompt has {count} {IMG_CONTEXT} tokens but the images need {sum(image_tokens)}; "
                "does the question text itself contain image tokens?"
            )

    def final_answer(self, text: str) -> str:
        """The answer after a think block or a Harmony `final` channel header (or the whole text), stripped."""
        if self.harmony:
            text = text.rsplit(FINAL_HEADER, 1)[-1]
            return text.replace(H_RETURN, "").replace(H_END, "").strip()
        if END_THINK in text:
            text = text.split(END_THINK, 1)[1]
        return text.replace(THINK, "").strip()


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, template: str = "internvl2_5"
) -> ChatTokenizer:
    """Train a small byte-level BPE on `texts` with InternVL3.5's special tokens (ids fixed by SPECIAL_TOKENS;
    the `internvl3_5_gpt_oss` template appends its Harmony tokens after them).

    Digits are split one per token (as Qwen's tokenizer does), which keeps numbers easy to read and write.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + (HARMONY_TOKENS if template == "internvl3_5_gpt_oss" else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise TokenizerError(
            f"tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size {vocab_size}"
        )
    return ChatTokenizer(tok, template=template)


def fallback_corpus() -> list[str]:
    """A little English and template text, for `tessera init` when the world is not wanted."""
    words = [
        "what",
        "is",
        "the",
        "colour",
        "of",
        "the",
        "shape",
        "label",
        "read",
        "text",
        "left",
        "right",
        "above",
        "below",
        "how",
        "many",
        "red",
        "green",
        "blue",
        "yellow",
        "circle",
        "square",
        "triangle",
        "answer",
        "think",
        "count",
        "number",
        "total",
        "plus",
        "minus",
        "image",
        "question",
    ]
    return [" ".join(words), DEFAULT_SYSTEM] + [str(i) for i in range(100)]


# ---- Qwen2 tokenizer files (vocab.json + merges.txt) ----------------------------------------------

# Qwen2's pre-tokenizer split (transformers' Qwen2 tokenizer uses the same pattern), then byte-level BPE
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def has_qwen2_files(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def _added_tokens(folder: Path) -> list[tuple[int, str, bool]]:
    """(id, content, special) of the tokens beyond the BPE vocabulary, from tokenizer_config.json's
    added_tokens_decoder and added_tokens.json."""
    found: dict[int, tuple[str, bool]] = {}
    for name in ("added_tokens.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{file}: not valid JSON ({e})") from None
        if name == "added_tokens.json":
            found.update({int(i): (t, True) for t, i in data.items()})
        else:
            for i, entry in (data.get("added_tokens_decoder") or {}).items():
                found[int(i)] = (entry["content"], bool(entry.get("special", True)))
    return sorted((i, t, special) for i, (t, special) in found.items())


def qwen2_tokenizer(folder: str | Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to transformers' Qwen2 tokenizer of vocab.json + merges.txt."""
    folder = Path(folder)
    try:
        bpe = models.BPE.from_file(
            str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=None
        )
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise TokenizerError(f"{folder}: unreadable vocab.json / merges.txt ({e})") from None
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = _added_tokens(folder)
    for i, content, special in added:
        tok.add_tokens([AddedToken(content, special=special, normalized=not special)])
        if tok.token_to_id(content) != i:
            raise TokenizerError(
                f"{folder}: added token {content!r} has id {i} in the config files but "
                f"{tok.token_to_id(content)} after the vocabulary; the files disagree"
            )
    return tok
